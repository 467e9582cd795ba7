"""What the child process runs: tie its life to jmoshi, adjust three things in moshi 0.2.2, then run
moshi.server unchanged.

moshi.server runs main() when imported, so it is executed here with runpy, never imported by jmoshi
itself. This is where the running server's behaviour is patched. Two other modules lean on
upstream internals, for their own reasons: generation.py (behind `jmoshi infer`) builds
CheckpointInfo itself and reads config.json the way CheckpointInfo.from_hf_repo does, because
from_hf_repo fetches by repo name while jmoshi loads the files it verified; tiny_model.py builds the
test model from loaders' private `_*_kwargs`, so that it has upstream's architecture, only smaller.

- Parent death: the child runs in its own session, so nothing kills it along with jmoshi. It asks
  the kernel for SIGKILL when jmoshi dies (see _die_with_parent), before torch is even imported.
- Bind address: 0.2.2 prints --host but calls web.run_app() without it, so it listens on every
  interface. JMOSHI_BIND_HOST makes run_app listen on exactly that address.
- CPU: the warm-up ends with torch.cuda.synchronize(), which raises without an NVIDIA driver.
  With no CUDA device there is nothing to synchronise, so it becomes a no-op.
- config.json: 0.2.2 has no --config-path and looks the config up on the hub by --hf-repo at
  revision main; JMOSHI_CONFIG_PATH hands it the file of the revision jmoshi resolved.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys


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


def main() -> None:
    _die_with_parent(os.environ.get("JMOSHI_PARENT_PID"))
    host = os.environ.get("JMOSHI_BIND_HOST")
    if host:
        _bind_host(host)
    _cpu_synchronize()
    config = os.environ.get("JMOSHI_CONFIG_PATH")
    if config:
        _config_path(config)
    sys.argv = ["moshi.server", *sys.argv[1:]]
    runpy.run_module("moshi.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
