"""What the server child changes in moshi.server before running it unchanged (checked on moshi 0.2.2 and
0.2.13). Each patch is one wrapper of one upstream function, applied once, whatever else is asked:

- `web.run_app` (aiohttp, called by moshi.server's main): listen on exactly the bind address
  (0.2.2 - 0.2.4 print --host but listen on every interface), then attach the conversation tap.
- `loaders.CheckpointInfo.from_hf_repo`: hand it the LM config of the resolved revision (0.2.2 has no
  --config-path and would read `main`'s from the hub), and seed with --seed where the server has just
  seeded 42424242 (nothing draws a random number in between).
- `web.WebSocketResponse` (made by moshi.server's handle_chat): each one is handed to jmoshi's gate as it is
  made, so that a conversation can be ended from outside its handler (idle, time limit, disk).
- `quantize.linear` / `multi_linear` (0.2.2): bitsandbytes imported for int8 layers only, and for an int8
  LM before it loads, without torch.compile's start-up (`moshi_int8`).
- einops' torch backend: no torch._dynamo import where nothing compiles (`einops_torch`, torch < 2.8).
- `torch.cuda.synchronize`: a no-op without CUDA (the warm-up calls it unconditionally).
- `loaders.get_mimi`: built without drawing the weights its file then replaces (`torch_init`), and its
  transposed convolutions off torch's slow CPU path (`torch_cpu`; same numbers).
- `loaders.get_moshi_lm`: built on the meta device without torch's initialisers (`torch_init`: no import
  of torch._dynamo); the float32 int8 scales moshi casts to the model's dtype put back (int8).
- The conversation tap: moshi.server's `ServerState` (found through its /api/chat route) gets proxies
  around `mimi`, `lm_gen` and `text_tokenizer`, which tell the listeners (the recorder) what the
  model heard, stepped and said, and send the browser J-Moshi's text joined by jmoshi's rule.

In `ServerState.handle_chat` (both versions), under the server's lock, `lm_gen.reset_streaming()`
starts a conversation; then per 80 ms frame `mimi.encode`, `lm_gen.step`, and when tokens come back
`mimi.decode` and `text_tokenizer.id_to_piece(...).replace("▁", " ")` for the text sent as 0x02.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import einops_torch, moshi_int8

CHECKED = ("0.2.2", "0.2.13")
CHAT_PATH = "/api/chat"


class Listener(Protocol):
    """What the tap tells: a conversation starts, the model heard a frame, stepped, said a frame."""

    def conversation_starts(self) -> None: ...

    def heard(self, x: Any) -> None: ...

    def stepped(self, tokens: Any) -> None: ...

    def said(self, pcm: Any) -> None: ...


@dataclass
class Patches:
    """What to change, decided by the bootstrap from the contract and the installed moshi."""

    bind_host: str | None = None  # only where this moshi ignores --host
    config_path: str | None = None  # only where this moshi has no --config-path
    int8_scales: bool = False  # the LM is int8 (moshi casts its float32 scales on load)
    seed: int | None = None
    on_app: list[Callable[[Any], None]] = field(default_factory=list)  # given the aiohttp app before it runs
    on_websocket: list[Callable[[Any], Any]] = field(default_factory=list)  # given each websocket as it is made


def apply(patches: Patches) -> None:
    _cpu_synchronize()
    moshi_int8.prepare(patches.int8_scales)
    einops_torch.skip_compile_registration()
    _get_mimi()
    _get_moshi_lm()
    _run_app(patches.bind_host, patches.on_app)
    if patches.on_websocket:
        _websockets(patches.on_websocket)
    if patches.config_path or patches.seed is not None:
        _from_hf_repo(patches.config_path, patches.seed)
    if patches.int8_scales:
        _int8_scales()


def _run_app(host: str | None, on_app: list[Callable[[Any], None]]) -> None:
    from aiohttp import web

    run_app = web.run_app

    @functools.wraps(run_app)
    def run_app_patched(app, *args, **kwargs):
        if host:
            kwargs["host"] = host
        for hook in on_app:
            hook(app)
        return run_app(app, *args, **kwargs)

    web.run_app = run_app_patched


def _websockets(hooks: list[Callable[[Any], Any]]) -> None:
    from aiohttp import web

    base = web.WebSocketResponse

    class Told(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for hook in hooks:
                hook(self)

    # moshi.server looks the class up on aiohttp.web at each request; nothing else in the child makes one.
    web.WebSocketResponse = Told  # type: ignore[misc]


def _cpu_synchronize() -> None:
    import torch

    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None


def _get_mimi() -> None:
    from moshi.models import loaders

    from . import torch_cpu, torch_init

    get_mimi = loaders.get_mimi

    @functools.wraps(get_mimi)
    def patched(*args, **kwargs):
        filename = args[0] if args else kwargs.get("filename")
        with torch_init.no_random_init(everywhere=filename is not None):  # then loaded strictly from the file
            mimi = get_mimi(*args, **kwargs)
        torch_cpu.fast_transposed_convs(mimi)
        return mimi

    # CheckpointInfo.get_mimi calls the module's get_mimi (both versions): every Mimi the child loads.
    loaders.get_mimi = patched


def _get_moshi_lm() -> None:
    from moshi.models import loaders

    from . import torch_init

    get_moshi_lm = loaders.get_moshi_lm

    @functools.wraps(get_moshi_lm)
    def patched(*args, **kwargs):
        with torch_init.no_random_init():
            return get_moshi_lm(*args, **kwargs)

    # CheckpointInfo.get_moshi calls the module's get_moshi_lm (both versions).
    loaders.get_moshi_lm = patched


def _from_hf_repo(config_path: str | None, seed: int | None) -> None:
    from moshi.models import loaders

    from ..sampling import seed_all

    from_hf_repo = loaders.CheckpointInfo.from_hf_repo

    @functools.wraps(from_hf_repo)
    def patched(*args, **kwargs):
        if seed is not None:
            seed_all(seed)
        # from_hf_repo(hf_repo, moshi_weights, mimi_weights, tokenizer, config_path, ...) in both versions
        if config_path and len(args) < 5 and not kwargs.get("config_path"):
            kwargs["config_path"] = config_path
        return from_hf_repo(*args, **kwargs)

    # Replacing upstream's method is the point: moshi.server calls it and has no hook of its own.
    loaders.CheckpointInfo.from_hf_repo = staticmethod(patched)  # type: ignore[method-assign]


def _int8_scales() -> None:
    from moshi.models import loaders

    from ..model.quantize import restore_scales

    get_moshi_lm = loaders.get_moshi_lm

    @functools.wraps(get_moshi_lm)
    def with_float32_scales(filename, lm_kwargs=None, *args, **kwargs):
        model = get_moshi_lm(filename, lm_kwargs, *args, **kwargs)
        if filename is not None and (lm_kwargs or {}).get("quantize"):
            restore_scales(model, Path(filename))
        return model

    loaders.get_moshi_lm = with_float32_scales


# --- the conversation tap ----------------------------------------------------------------------------


def server_state(app) -> Any:
    """The ServerState whose handle_chat serves /api/chat (the route holds its bound method)."""
    for route in app.router.routes():
        resource = route.resource
        if route.method == "GET" and resource is not None and resource.canonical == CHAT_PATH:
            state = getattr(route.handler, "__self__", None)
            if all(hasattr(state, name) for name in ("mimi", "lm_gen", "text_tokenizer")):
                return state
    raise RuntimeError(f"jmoshi: this moshi.server has no {CHAT_PATH} handler with mimi, lm_gen and "
                       "text_tokenizer; jmoshi cannot attach to it")


SAMPLING_KEYS = ("temp", "temp_text", "top_k", "top_k_text")


def model_facts(state: Any):
    """What the recorder needs of moshi.server's model: tokenizer, delay, sampling, device and dtype."""
    from ..recording.tap import ModelFacts

    parameter = next(iter(state.lm_gen.lm_model.parameters()), None)
    return ModelFacts(state.text_tokenizer, int(getattr(state.lm_gen, "max_delay", 1)),
                      {key: getattr(state.lm_gen, key, None) for key in SAMPLING_KEYS},
                      str(parameter.device) if parameter is not None else None,
                      str(parameter.dtype).removeprefix("torch.") if parameter is not None else None)


def tap(state: Any, listeners: list[Listener]) -> None:
    """Proxies around the server's model objects; the browser's text is joined as transcripts are."""
    joiner = BrowserText(state.text_tokenizer)
    everyone = [joiner, *listeners]
    state.mimi = _TappedMimi(state.mimi, everyone)
    state.lm_gen = _TappedLMGen(state.lm_gen, everyone)
    state.text_tokenizer = joiner


class _Proxy:
    """Forwards everything to the wrapped object except the calls a subclass taps."""

    def __init__(self, inner: Any, listeners: list):
        self._inner = inner
        self._listeners = listeners

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _TappedMimi(_Proxy):
    def encode(self, x, *args, **kwargs):
        for listener in self._listeners:
            listener.heard(x)
        return self._inner.encode(x, *args, **kwargs)

    def decode(self, codes, *args, **kwargs):
        pcm = self._inner.decode(codes, *args, **kwargs)
        for listener in self._listeners:
            listener.said(pcm)
        return pcm


class _TappedLMGen(_Proxy):
    def step(self, *args, **kwargs):
        tokens = self._inner.step(*args, **kwargs)
        for listener in self._listeners:
            listener.stepped(tokens)
        return tokens

    def reset_streaming(self, *args, **kwargs):
        done = self._inner.reset_streaming(*args, **kwargs)
        for listener in self._listeners:
            listener.conversation_starts()
        return done


class BrowserText:
    """The tokenizer as moshi.server uses it for the browser, with the pieces' `▁` already decided.

    The server turns every `▁` into a space, which puts spaces inside Japanese sentences. Here a
    piece's leading `▁` stays a space only between two characters of scripts written with spaces
    (transcript.join_pieces' rule, the one the recordings' transcript.json uses), so the page shows
    what the transcript says. It needs the last character sent, kept per conversation.
    """

    def __init__(self, tokenizer: Any):
        from ..transcript import PieceJoiner

        self._tokenizer = tokenizer
        self._joiner = PieceJoiner()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def id_to_piece(self, token: int) -> str:
        piece = self._tokenizer.id_to_piece(token)
        return self._joiner.feed(piece) if isinstance(piece, str) else piece

    def conversation_starts(self) -> None:
        from ..transcript import PieceJoiner

        self._joiner = PieceJoiner()

    def heard(self, x: Any) -> None:
        pass

    def stepped(self, tokens: Any) -> None:
        pass

    def said(self, pcm: Any) -> None:
        pass
