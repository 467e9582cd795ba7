"""The contract between jmoshi and its server child: one typed value, written once, read once; and the
child's command line as the backends render it (`Launch`), which the supervisor runs.

jmoshi (the parent) builds a `ChildContract` with everything the child needs besides its command line
(which process it must not outlive, where to bind, the LM config, precision, CPU threads, recording,
seed and sampling, the replica's name) and hands it over in one environment variable, as JSON. The
child's bootstrap reads it back with `ChildContract.from_env` and nothing else reads jmoshi's
variables. `ENV` is the only name of it; no other module spells it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ..addresses import url_host
from ..model.precision import Precision

ENV = "JMOSHI_CHILD"


@dataclass(frozen=True)
class Recording:
    """`serve --record`: the folder, and what only jmoshi knows of the model (for each meta.json)."""

    folder: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Access:
    """Who may talk to the child's server (serving/gate.py checks it on every request)."""

    token: str | None = None  # None: --no-token, anyone who reaches the port
    allow_origins: tuple[str, ...] = ()  # browser pages of other origins that may open /api/chat ("*": any)
    consent: str | None = None  # with --record: the operator's text for the consent page ("" none); None: no page
    secret: str = ""  # signs consent cookies; the same in every replica of one run, new at every run


@dataclass(frozen=True)
class Limits:
    """What frees a conversation's slot and bounds what waits (serving/visits.py)."""

    idle_s: float = 30.0  # no audio for this long ends a conversation (a browser streams even in silence)
    max_s: float | None = None  # --max-minutes: the longest a conversation may last
    max_waiting: int = 8  # conversations that may wait for a slot; beyond, a "busy" answer
    min_free_mb: int = 1024  # with --record: below this free space a recording does not start, or stops


@dataclass(frozen=True)
class ChildContract:
    parent_pid: int | None = None  # the child asks the kernel to kill it when this process dies
    bind_host: str | None = None  # listen on exactly this address (moshi < 0.2.5 ignores --host)
    config_path: str | None = None  # the LM config of the resolved revision (moshi < 0.2.4 has no --config-path)
    precision: Precision = Precision.BF16  # how the LM's weights are held, decided once by jmoshi
    threads: int | None = None  # torch's intra-op threads on the CPU (None: on a GPU, torch's default)
    record: Recording | None = None
    seed: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # what jmoshi put in the LM config's lm_gen_config
    replica: str | None = None  # with --replicas: this child's name, for each recording's meta.json
    access: Access = field(default_factory=Access)
    limits: Limits = field(default_factory=Limits)

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ChildContract:
        """The contract jmoshi wrote; an empty one when run by hand (no jmoshi parent)."""
        text = env.get(ENV)
        if not text:
            return cls()
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if data.get("record") is not None:
            data["record"] = Recording(**data["record"])
        if "access" in data:
            data["access"] = Access(**{**data["access"], "allow_origins": tuple(data["access"]["allow_origins"])})
        if "limits" in data:
            data["limits"] = Limits(**data["limits"])
        if "precision" in data:
            data["precision"] = Precision(data["precision"])
        return cls(**data)

    def with_parent(self, pid: int) -> ChildContract:
        return replace(self, parent_pid=pid)

    @property
    def record_dir(self) -> Path | None:
        return Path(self.record.folder) if self.record is not None else None


def without_contract(env: Mapping[str, str]) -> dict[str, str]:
    """An environment with no contract of ours left in it (a child of a child must not inherit one)."""
    return {k: v for k, v in env.items() if k != ENV}


@dataclass(frozen=True)
class Launch:
    """A child's command line, rendered: argv, environment, where it listens, and its contract."""

    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    scheme: str
    contract: ChildContract | None = None  # a server child's; None for any other program
    name: str = "moshi.server"  # what people call it in messages
    slots: int = 1  # conversations it holds at once

    @property
    def url(self) -> str:
        return f"{self.scheme}://{url_host(self.host)}:{self.port}/"

    @property
    def token(self) -> str | None:
        return self.contract.access.token if self.contract is not None else None

    def page_url(self, host: str | None = None) -> str:
        """The URL a person opens (on this machine, or through `host`): with the token when there is one."""
        base = self.url if host is None else f"{self.scheme}://{url_host(host)}:{self.port}/"
        return base + (f"?token={self.token}" if self.token else "")
