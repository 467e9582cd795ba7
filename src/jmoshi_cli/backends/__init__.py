"""Serving backends: what runs J-Moshi behind the /api/chat protocol and the web UI.

A backend says which flags and precisions it supports (and refuses the others in one line), which
files it needs for a precision, and how its server child is started; readiness is the same for all
(the child's port accepts a connection). `torch` runs Kyutai's moshi.server on PyTorch (Linux,
NVIDIA or CPU); `mlx` runs jmoshi's own small server on Kyutai's moshi_mlx (Apple Silicon, or MLX's
CPU backend on Linux).

    backend = backends.choose(options.backend)
    backend.refuse(options)                     # one line per unsupported flag
    model = backend.prepare(request, ...)       # PreparedModel: files for the chosen precision
    launch = backends.render(ServerSpec(backend.name, ...))   # argv and env, rendered last
"""

from __future__ import annotations

from .base import Backend, Features, Kind, ServerSpec, cpu_threads, is_apple_silicon, parse_kind
from .contract import ChildContract, Launch

__all__ = ["Backend", "ChildContract", "Features", "Kind", "Launch", "ServerSpec", "choose", "cpu_threads", "get",
           "is_apple_silicon", "parse_kind", "render"]


def choose(text: str | None) -> Backend:
    """--backend: auto is mlx on macOS arm64 and torch elsewhere."""
    kind = parse_kind(text)
    if kind is Kind.AUTO:
        kind = Kind.MLX if is_apple_silicon() else Kind.TORCH
    return get(kind)


def get(kind: Kind) -> Backend:
    if kind is Kind.MLX:
        from .mlx import MlxBackend

        return MlxBackend()
    from .pytorch import TorchBackend

    return TorchBackend()


def render(spec: ServerSpec) -> Launch:
    """The server child's command line and environment, from its backend, rendered last."""
    return get(spec.backend).command(spec)
