"""What the child process runs: tie its life to jmoshi, adjust what the installed moshi lacks (see
runtime.py: three things in 0.2.2; in 0.2.13 one, and the int8 scales), then run moshi.server unchanged.

moshi.server runs main() when imported, so it is executed here with runpy, never imported by jmoshi
itself. This is where the running server's behaviour is patched. Two other modules lean on
upstream internals, for their own reasons: generation.py (behind `jmoshi infer`) builds
CheckpointInfo itself and reads config.json the way CheckpointInfo.from_hf_repo does, because
from_hf_repo fetches by repo name while jmoshi loads the files it verified; tiny_model.py builds the
test model from loaders' private `_*_kwargs`, so that it has upstream's architecture, only smaller.

- Parent death: the child runs in its own session, so nothing kills it along with jmoshi. It asks
  the kernel for SIGKILL when jmoshi dies (see _die_with_parent), before torch is even imported.
- Bind address: 0.2.2 - 0.2.4 print --host but call web.run_app() without it, so they listen on every
  interface. JMOSHI_BIND_HOST makes run_app listen on exactly that address (0.2.5+: --host does).
- CPU: the warm-up ends with torch.cuda.synchronize(), which raises without an NVIDIA driver.
  With no CUDA device there is nothing to synchronise, so it becomes a no-op.
- config.json: 0.2.2 has no --config-path and looks the config up on the hub by --hf-repo at
  revision main; JMOSHI_CONFIG_PATH hands it the file of the revision jmoshi resolved (0.2.4+: as
  --config-path).
- int8 (JMOSHI_INT8): moshi casts every floating tensor of a checkpoint to the model's dtype, the
  int8 scales included, which its QLinear then refuses; the float32 scales are put back after loading.
- Recording and seed (JMOSHI_RECORD, JMOSHI_SEED, JMOSHI_SAMPLING): recorder.install taps the
  conversation handler's model calls once moshi.server calls web.run_app, and seeds with --seed
  where the server seeds 42424242.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
from dataclasses import dataclass
from typing import Mapping

from . import runtime


def _die_with_parent(parent_pid: str | None) -> None:
    """SIGKILL this process when jmoshi (the process that started it) dies, however it dies.

    SIGKILL rather than SIGTERM: once jmoshi is gone nobody is left to escalate, and on SIGTERM
    aiohttp shuts down gracefully, waiting up to 60 s for a running conversation while the child
    keeps the GPU memory and the port. The server has nothing to save, so nothing is lost.

    The signal is only armed from here on: if jmoshi died between the fork and now, the child was
    already handed to another parent and no signal will come, so it checks its parent and leaves.
    """
    if not parent_pid:
        return  # run by hand, not by jmoshi: nothing to follow
    from .lifetime import die_with_parent

    die_with_parent(int(parent_pid), signal.SIGKILL)


@dataclass(frozen=True)
class Plan:
    """What the bootstrap does for the installed moshi: flags it has, patches for what it lacks."""

    argv: list[str]
    bind_host: str | None = None  # patch web.run_app to listen there (moshi < 0.2.5 ignores --host)
    patch_config: str | None = None  # patch CheckpointInfo.from_hf_repo (moshi < 0.2.4 has no --config-path)
    int8_scales: bool = False  # put back the float32 int8 scales moshi casts on load (quantize.py)


def plan_for(rt: runtime.Runtime, env: Mapping[str, str], argv: list[str]) -> Plan:
    """Pure: JMOSHI_BIND_HOST and JMOSHI_CONFIG_PATH as flags where this moshi has them, else patches."""
    argv = list(argv)
    host = env.get("JMOSHI_BIND_HOST") or None
    config = env.get("JMOSHI_CONFIG_PATH") or None
    if config and rt.has_config_path and "--config-path" not in argv:
        argv += ["--config-path", config]
    return Plan(argv, bind_host=None if rt.honours_host else host,
                patch_config=None if rt.has_config_path else config, int8_scales=env.get("JMOSHI_INT8") == "1")


def _bind_host(host: str) -> None:
    from aiohttp import web

    run_app = web.run_app

    @functools.wraps(run_app)
    def run_app_on_host(app, *args, **kwargs):
        kwargs["host"] = host
        return run_app(app, *args, **kwargs)

    web.run_app = run_app_on_host


def _cpu_synchronize() -> None:
    import torch

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None


def _config_path(path: str) -> None:
    from moshi.models import loaders

    from_hf_repo = loaders.CheckpointInfo.from_hf_repo

    def with_config(hf_repo, moshi_weights=None, mimi_weights=None, tokenizer=None, config_path=None):
        return from_hf_repo(hf_repo, moshi_weights, mimi_weights, tokenizer, config_path or path)

    loaders.CheckpointInfo.from_hf_repo = staticmethod(with_config)


def _int8_scales() -> None:
    from pathlib import Path

    from moshi.models import loaders

    from .quantize import restore_scales

    get_moshi_lm = loaders.get_moshi_lm

    @functools.wraps(get_moshi_lm)
    def with_float32_scales(filename, lm_kwargs=None, *args, **kwargs):
        model = get_moshi_lm(filename, lm_kwargs, *args, **kwargs)
        if filename is not None and (lm_kwargs or {}).get("quantize"):
            restore_scales(model, Path(filename))
        return model

    loaders.get_moshi_lm = with_float32_scales


def _say(line: str) -> None:
    # The child's console is its stdout, which jmoshi relays; one write keeps a line whole between threads.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _record_and_seed() -> None:
    """--record, --seed, sampling: the tap on the conversation handler (see recorder.py), when asked for."""
    from .recorder import Settings, install

    install(Settings.from_env(os.environ), _say)


def main() -> None:
    _die_with_parent(os.environ.get("JMOSHI_PARENT_PID"))
    plan = plan_for(runtime.detect(), os.environ, sys.argv[1:])
    if plan.bind_host:
        _bind_host(plan.bind_host)
    _cpu_synchronize()
    if plan.patch_config:
        _config_path(plan.patch_config)
    if plan.int8_scales:
        _int8_scales()
    sys.argv[1:] = plan.argv
    _record_and_seed()
    sys.argv = ["moshi.server", *sys.argv[1:]]
    runpy.run_module("moshi.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
