"""What the child process runs: adjust two things in moshi 0.2.2, then run moshi.server unchanged.

This is the only place that touches upstream internals. moshi.server runs main() when imported, so
it is executed here with runpy, never imported by jmoshi itself.

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
import sys


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
