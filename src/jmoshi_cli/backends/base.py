"""What every backend is and is asked: its kind, the features a run wants, one server child as data
(`ServerSpec`), the `Backend` interface, and the CPU share of a server on the CPU."""

from __future__ import annotations

import os
import platform
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import UsageError
from ..model.precision import Precision
from .contract import ChildContract, Launch

if TYPE_CHECKING:
    from ..cache.artifacts import ModelFiles, WatchFactory
    from ..model.preparation import ModelRequest, PreparedModel


class Kind(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    MLX = "mlx"


@dataclass(frozen=True)
class Features:
    """What a serve run asks of a backend beyond the model: checked by `Backend.refuse`."""

    replicas: bool = False
    lora: bool = False
    half: bool = False
    device: str = "auto"
    conversations: str | None = None  # the flag that asks for several conversations on one model (or --batch)


@dataclass(frozen=True)
class ServerSpec:
    """One server child, as structure; `render` turns it into a command line last."""

    backend: Kind
    files: ModelFiles
    repo: str
    precision: Precision
    host: str
    port: int
    device: str
    half: bool = False
    ssl_dir: Path | None = None
    contract: ChildContract = field(default_factory=ChildContract)
    conversations: int = 1  # held at once by one loaded model (engine slots); 1: moshi.server
    base_env: Mapping[str, str] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_dir is not None else "http"

    def on_loopback(self, port: int, device: str | None = None, threads: int | None = None,
                    replica: str | None = None) -> ServerSpec:
        """This server moved to 127.0.0.1:port in plain HTTP (TLS ends at a front), e.g. as a replica."""
        contract = replace(self.contract, bind_host="127.0.0.1", threads=threads, replica=replica)
        return replace(self, host="127.0.0.1", port=port, device=device or self.device, ssl_dir=None,
                       contract=contract)


class Backend(ABC):
    kind: Kind
    server_name: str  # what people read in "starting ..." and in errors
    precisions: tuple[Precision, ...]

    @property
    def name(self) -> str:
        return self.kind.value

    @abstractmethod
    def device(self, asked: str) -> str:
        """--device as this backend runs it (`auto`: its natural device)."""

    @abstractmethod
    def refuse(self, wanted: Features) -> None:
        """UsageError, one line, for the first thing asked that this backend cannot do."""

    @abstractmethod
    def prepare(self, request: ModelRequest, *, web_ui: bool, watch: WatchFactory | None = None,
                on_note=lambda note: None) -> PreparedModel:
        """The model's files for the precision this backend and device settle on."""

    @abstractmethod
    def command(self, spec: ServerSpec) -> Launch:
        """The child's argv and environment: everything it gets, as data."""

    @abstractmethod
    def for_infer(self, device: str) -> None:
        """Settings `jmoshi infer` gives its own process before anything imports the runtime (preparing the
        model may import it: the int8 checkpoint is made with moshi's own LM)."""

    @abstractmethod
    def load_for_infer(self, files: ModelFiles, options: Any, device: str, quiet: bool = True) -> Any:
        """The model loaded for `jmoshi infer` (infer.pipeline.Generating), from the files `prepare` gave;
        `options`: infer.options.InferOptions, `device` as `self.device` resolved it."""

    def from_local(self, files: ModelFiles, folder: Path, on_step=lambda step: None) -> ModelFiles:
        """The files this backend's server loads, made in `folder` from a local PyTorch checkpoint that no
        cache verified (the selftest's tiny model). PyTorch loads those files as they are."""
        return files


def cpu_threads(share: int = 1, cores: int | None = None) -> int:
    """torch's intra-op threads for one of `share` servers on the CPU.

    One core is left to the event loop, the Opus codec, jmoshi and the client: with as many
    threads as cores, a single busy core (another program) stalls every parallel region of every
    frame, since OpenMP waits for its slowest thread (median 1,660 ms a frame instead of 168 ms on 2 cores
    beside one CPU-bound process: bench/serve.py).
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // max(1, share))


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def parse_kind(text: str | None) -> Kind:
    try:
        return Kind((text or "auto").lower())
    except ValueError:
        raise UsageError(f"--backend {text!r} is not auto, torch or mlx",
                         "auto is mlx on Apple Silicon and torch elsewhere") from None
