"""What the torch backend's child runs: tie its life to jmoshi, read its contract, patch what the
installed moshi lacks (upstream/moshi_server.py), then run moshi.server unchanged.

moshi.server runs main() when imported, so it is executed here with runpy, never imported by jmoshi
itself. The contract (backends/contract.py) is read once, here; the parent death signal is armed
before torch is even imported.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from dataclasses import dataclass

from . import runtime
from .backends.contract import ChildContract
from .model.precision import Precision
from .upstream import moshi_server


def _die_with_parent(parent_pid: int | None) -> None:
    """SIGKILL this process when jmoshi (the process that started it) dies, however it dies.

    SIGKILL rather than SIGTERM: once jmoshi is gone nobody is left to escalate, and on SIGTERM
    aiohttp shuts down gracefully, waiting up to 60 s for a running conversation while the child
    keeps the GPU memory and the port. The server has nothing to save, so nothing is lost.
    """
    if parent_pid is None:
        return  # run by hand, not by jmoshi: nothing to follow
    from .serving.lifetime import die_with_parent

    die_with_parent(parent_pid, signal.SIGKILL)


@dataclass(frozen=True)
class Plan:
    """For the installed moshi: the flags it has, and the patches for what it lacks."""

    argv: list[str]
    patches: moshi_server.Patches


def plan_for(rt: runtime.Runtime, contract: ChildContract, argv: list[str]) -> Plan:
    """Pure: the bind address and config path as flags where this moshi has them, else as patches."""
    argv = list(argv)
    config = contract.config_path
    if config and rt.has_config_path:  # the backend never puts it in argv: the contract carries it
        argv += ["--config-path", config]
    return Plan(argv, moshi_server.Patches(
        bind_host=None if rt.honours_host else contract.bind_host,
        config_path=None if rt.has_config_path else config,
        int8_scales=contract.precision is Precision.INT8, seed=contract.seed))


def _say(line: str) -> None:
    # The child's console is its stdout, which jmoshi relays; one write keeps a line whole between threads.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _tap(contract: ChildContract):
    """The hook given the aiohttp app: the gate (who gets in, each conversation followed), the browser's
    text, and the recorder when asked for."""
    from .recording.tap import Recorder, Settings
    from .serving import gate, visits

    settings = Settings.from_contract(contract)
    recorder = Recorder(settings, _say) if settings.wanted else None

    def attach(app) -> None:
        state = moshi_server.server_state(app)
        listeners: list[moshi_server.Listener] = [visits.Listener()]
        if recorder is not None:
            recorder.attach(app, moshi_server.model_facts(state))  # first: the tokenizer, not the browser's
            listeners.append(recorder)
        moshi_server.tap(state, listeners)
        gate.install(app, contract.access, contract.limits, _say)

    return attach


def _adopt(ws):
    from .serving import visits

    return visits.adopt(ws)


def main() -> None:
    contract = ChildContract.from_env(os.environ)
    _die_with_parent(contract.parent_pid)
    runtime.limit_threads(contract.threads)
    plan = plan_for(runtime.detect(), contract, sys.argv[1:])
    plan.patches.on_app.append(_tap(contract))
    plan.patches.on_websocket.append(_adopt)
    moshi_server.apply(plan.patches)
    sys.argv = ["moshi.server", *plan.argv]
    runpy.run_module("moshi.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
