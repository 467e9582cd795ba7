"""File inference: feed recordings of a user to J-Moshi and save what it answers.

The model is loaded once (:class:`Session`) and every input is processed in turn (:func:`run`).
For an input ``<stem>.<ext>`` three files are written to the output folder:

- ``<stem>.jmoshi.wav``: J-Moshi's voice, 24 kHz, mono, 16-bit PCM;
- ``<stem>.dialogue.wav``: 24 kHz stereo, the user (what the model heard: the chosen channel,
  resampled to 24 kHz) on the left and J-Moshi on the right, sample-aligned;
- ``<stem>.transcript.json``: J-Moshi's text pieces with their frame index and time, and the
  joined text (see :func:`join_pieces`).

Lengths. The input is resampled to 24 kHz (``ceil(n * 24000 / rate)`` samples, no delay) and
padded with silence to whole 80 ms frames: ``frames = ceil(samples_24k / 1920)``. Both wav files
hold exactly ``frames * 1920`` samples: J-Moshi's output has the length of the input, rounded up
to a whole frame.

Alignment. Moshi models two streams on one timeline of 80 ms frames; position 0 holds the
initial tokens and position ``p >= 1`` holds the user's and J-Moshi's frame ``p - 1``. As in
``moshi.run_inference``, the first frame's codes are fed twice: the first ``LMGen.step`` only
fills position 0 (its input is replaced by the initial tokens), so the user's frame 0 really lands
at position 1 and no input is lost (``moshi.server`` instead resets Mimi's encoder after the first
frame and lets that frame fall on position 0: it drops the first 80 ms of the user). ``LMGen``
returns position ``p`` once its delayed codebooks are generated, ``max_delay`` steps later
(returns None before); steps with silence are added after the input so that all ``frames``
positions come out (none for J-Moshi, whose ``max_delay`` is 1). Output frame ``t`` is therefore
what J-Moshi says while the user's frame ``t`` plays, exactly as the two streams line up in the
model. It is causal: the frame's text and semantic tokens were sampled from the user's audio up to
frame ``t - 1``, its delayed acoustic tokens also saw frame ``t``, as in a live session where that
frame is produced once the user's frame ``t`` has arrived; so a live client (``moshi.server``)
hears it at least one frame (80 ms) later than here, plus compute and network time. Nothing is
padded in front: output frame 0 is sampled from the initial tokens (and, for its acoustic
tokens, the user's frame 0).

Long inputs. The LM attends to ``context`` frames (3000 = 240 s for J-Moshi); past it moshi's
ring KV cache slides and the model goes on with a window it was not built for (quality unknown,
never promised upstream). An input longer
than ``context`` frames is split (warn-and-split): it is processed as consecutive segments of at
most ``context`` frames, J-Moshi's state reset at each boundary (it forgets what was said before),
and the outputs are concatenated, so the lengths stay as above. ``FileResult.note`` and
``segments`` say so, and the transcript lists the segments.

dtype. The LM runs in bfloat16 (``moshi``'s default) on both CUDA and CPU, or in float16 with
``half``; Mimi stays in float32 as upstream. On CPU float32 is not offered: J-Moshi's 7.7 B
parameters take 31 GB in float32 against 15.4 GB in bfloat16, and bfloat16 runs fine on CPU
(on 2 cores with a tiny LM: LM step ~12 ms bf16, ~9 ms fp32, ~38 ms fp16; Mimi ~160 ms a frame
dominates either way). CPU inference of the 7 B model is far slower than real time.

Sampling. ``temp`` / ``temp_text`` / ``top_k`` / ``top_k_text`` left as None take the model's
``lm_gen_config`` (config.json) and else ``LMGen``'s defaults (0.8 / 0.7 / 250 / 25), as
upstream. With ``seed`` set, torch's generator is seeded at the start of each file (the state of
the caller's generator is restored afterwards), so a file's output depends only on the file, the
model, the options and the seed: same input and seed give byte-identical files on the same
machine and torch build. Without ``seed`` every run samples afresh (upstream seeds a constant).

Errors. A file that cannot be read, holds no samples, or whose outputs cannot be written gives a
``FileResult`` with ``ok=False`` and the next file is processed; callers exit non-zero at the end
when any result failed. Problems that concern the whole run (no inputs, output folder not
writable, model files missing or corrupt, no CUDA) raise :class:`~jmoshi_cli.errors.JMoshiError`
subclasses before the model is loaded or while it loads. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import numpy as np

from . import audio_io
from .artifacts import ModelFiles
from .errors import CacheError, JMoshiError, PreflightError, UsageError

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms frame at 24 kHz
FRAME_S = FRAME_SIZE / SAMPLE_RATE

# LMGen's defaults in moshi 0.2.2, used when neither the options nor config.json say otherwise.
LMGEN_DEFAULTS = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
# Text ids never shown (as moshi.server): 0 and 3 (J-Moshi's padding). Control pieces are dropped too.
SKIPPED_TEXT_IDS = (0, 3)

OUTPUT_SUFFIXES = {
    "jmoshi": ".jmoshi.wav",
    "dialogue": ".dialogue.wav",
    "transcript": ".transcript.json",
}

OnFrame = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferOptions:
    """How to run the model. Sampling values left as None come from config.json / LMGen."""

    device: str = "cuda"
    half: bool = False
    channel: str = "left"
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.channel not in audio_io.CHANNELS:
            raise UsageError(
                f"unknown channel {self.channel!r}", hint=f"use one of: {', '.join(audio_io.CHANNELS)}"
            )
        if not (self.device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise UsageError(f"unknown device {self.device!r}", hint="use cuda, cuda:N or cpu")
        for name in ("temp", "temp_text"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{name} must be a number >= 0, not {value}", hint="0 means greedy decoding")
        for name in ("top_k", "top_k_text"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 0):
                raise UsageError(f"{name} must be an integer >= 0, not {value}")
        if self.seed is not None and (int(self.seed) != self.seed or self.seed < 0):
            raise UsageError(f"seed must be an integer >= 0, not {self.seed}")


@dataclass
class FileResult:
    """What happened to one input.

    ``audio_s`` is the input's duration; ``compute_s`` the time spent on it (reading, model,
    writing); ``rtf`` = compute_s / audio_s (below 1: faster than real time). ``outputs`` maps
    ``jmoshi`` / ``dialogue`` / ``transcript`` to the files written (empty when ``ok`` is False).
    ``note`` tells what a person should know (channel used, input split, ...).
    """

    source: Path
    ok: bool
    error: str | None = None
    audio_s: float = 0.0
    compute_s: float = 0.0
    rtf: float = 0.0
    outputs: dict[str, Path] = field(default_factory=dict)
    note: str | None = None
    channel: str | None = None  # left / right / mix / mono
    sample_rate: int | None = None  # of the input
    frames: int = 0
    segments: int = 0
    text: str = ""


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


def _is_own_output(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(OUTPUT_SUFFIXES["jmoshi"]) or name.endswith(OUTPUT_SUFFIXES["dialogue"])


def collect_inputs(paths: Iterable[Path], on_warning: Callable[[str], None] | None = None) -> list[Path]:
    """Expand the command line's paths into the list of files to process.

    A file is kept as given (whatever its extension: decoding decides). A folder is searched
    recursively for ``.wav .flac .mp3 .ogg .oga .opus`` files (any case), in sorted path order,
    skipping hidden files and folders and this command's own ``*.jmoshi.wav`` / ``*.dialogue.wav``.
    The same file given twice is kept once. A path that does not exist raises UsageError (before
    any model is loaded); a folder without audio is reported through ``on_warning``; UsageError
    when nothing at all is left.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    empty_dirs: list[Path] = []

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("no input given", hint="pass audio files or folders: jmoshi infer talk.wav")
    for path in paths:
        if path.is_dir():
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in names:
                    p = Path(root) / name
                    if name.startswith(".") or _is_own_output(p):
                        continue
                    if p.suffix.lower() in audio_io.AUDIO_EXTENSIONS and p.is_file():
                        found.append(p)
            if not found:
                empty_dirs.append(path)
                if on_warning is not None:
                    on_warning(f"no audio files in {path}")
            for p in sorted(found):
                add(p)
        elif path.exists():
            add(path)
        else:
            raise UsageError(f"no such file or folder: {path}", hint="check the path")
    if not files:
        where = ", ".join(str(d) for d in empty_dirs)
        raise UsageError(
            f"no audio files in {where}",
            hint="supported: " + " ".join(audio_io.AUDIO_EXTENSIONS),
        )
    return files


def output_names(sources: list[Path]) -> dict[Path, str]:
    """A distinct output base name for each source: its stem, unless several sources share it.

    Sources sharing a stem are named after their path relative to the deepest folder they have in
    common, folders joined with ``__`` (``a/x.wav`` and ``b/x.wav`` -> ``a__x`` and ``b__x``),
    keeping the extension when that is what differs (``x.wav`` / ``x.flac`` -> ``x.wav`` /
    ``x.flac``); a counter settles anything left. Comparison ignores case.
    """
    names: dict[Path, str] = {}
    by_stem: dict[str, list[Path]] = {}
    for src in sources:
        by_stem.setdefault(src.stem.lower(), []).append(src)
    for group in by_stem.values():
        if len(group) == 1:
            names[group[0]] = group[0].stem
            continue
        resolved = [g.resolve() for g in group]
        common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
        rel = [r.relative_to(common) for r in resolved]
        stems = ["__".join([*r.parent.parts, r.stem]) for r in rel]
        if len({s.lower() for s in stems}) < len(stems):
            stems = ["__".join([*r.parent.parts, r.name]) for r in rel]
        for src, stem in zip(group, stems, strict=True):
            names[src] = stem
    used: set[str] = set()
    for src in sources:  # settle collisions with other stems (e.g. a literal "a__x.wav"), in order
        base = names[src]
        name, i = base, 2
        while name.lower() in used:
            name, i = f"{base}-{i}", i + 1
        used.add(name.lower())
        names[src] = name
    return names


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    return {key: Path(out_dir) / f"{name}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


def prepare_out_dir(out_dir: Path) -> Path:
    """Create the output folder and check that a file can be written there; UsageError if not."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create the output folder {out_dir}: {exc.strerror or exc}",
            hint="choose another folder with --out",
        ) from exc
    probe = out_dir / f".jmoshi-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise UsageError(
            f"cannot write to the output folder {out_dir}: {exc.strerror or exc}",
            hint="choose another folder with --out",
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return out_dir


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

# Scripts written without spaces between words (and their punctuation).
_NO_SPACE_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x2E80, 0x2FFF),  # CJK radicals, Kangxi, ideographic description
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」 and the ideographic space)
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x31FF),  # Bopomofo, Hangul compatibility jamo... Katakana phonetic extensions
    (0x3200, 0x33FF),  # enclosed CJK, CJK compatibility
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # full-width and half-width forms (！？（）ｶﾅ, full-width letters)
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_MARKER_RUN = re.compile("\u2581+")


def _no_space_script(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _NO_SPACE_RANGES)


def join_pieces(pieces: Iterable[str]) -> str:
    """Join SentencePiece pieces into text without the spurious spaces of Japanese.

    SentencePiece marks a word start with ``▁`` (U+2581), and upstream shows each as a space,
    which puts spaces inside Japanese sentences. Rule: each run of ``▁`` becomes one space when
    the characters on both sides of it are outside the scripts written without spaces (Japanese
    kana and kanji, CJK punctuation such as 、。, full-width forms, Chinese, Thai...) and is
    dropped otherwise; a run at the start or the end is dropped. So ``▁こんにちは ▁今日は`` gives
    ``こんにちは今日は``, ``▁Hello , ▁world`` gives ``Hello, world`` and ``▁3 ▁時`` gives ``3時``.
    Byte-fallback pieces (``<0xE3>``...) are decoded as UTF-8.
    """
    raw = bytearray()
    for piece in pieces:
        m = _BYTE_PIECE.fullmatch(piece)
        raw += bytes([int(m.group(1), 16)]) if m else piece.encode("utf-8")
    text = raw.decode("utf-8", errors="replace")

    def repl(m: re.Match[str]) -> str:
        start, end = m.start(), m.end()
        if start == 0 or end == len(text):
            return ""
        before, after = text[start - 1], text[end]
        if before.isspace() or after.isspace() or _no_space_script(before) or _no_space_script(after):
            return ""
        return " "

    return _MARKER_RUN.sub(repl, text)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _read_config(files: ModelFiles) -> tuple[dict | None, dict | None, str, dict]:
    """config.json as moshi's CheckpointInfo.from_hf_repo reads it: (lm_config, raw, model_type, lm_gen)."""
    if files.config is None:
        return None, None, "moshi", {}
    try:
        raw = json.loads(Path(files.config).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CacheError(f"model config not found: {files.config}", hint="download the model again") from exc
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read the model config {files.config}: {exc}",
                         hint="the file may be corrupt: download the model again") from exc
    if not isinstance(raw, dict):
        raise CacheError(f"model config {files.config} is not a JSON object", hint="download the model again")
    lm_config = dict(raw)
    for key in ("moshi_name", "mimi_name", "tokenizer_name"):
        lm_config.pop(key, None)
    model_type = lm_config.pop("model_type", "moshi")
    lm_gen_config = lm_config.pop("lm_gen_config", {}) or {}
    return lm_config, raw, model_type, dict(lm_gen_config)


def resolve_sampling(options: InferOptions, lm_gen_config: dict) -> dict[str, Any]:
    """Sampling parameters for LMGen: options, else config.json's lm_gen_config, else LMGen defaults."""
    sampling = dict(LMGEN_DEFAULTS)
    sampling.update(lm_gen_config)
    for key in LMGEN_DEFAULTS:
        value = getattr(options, key)
        if value is not None:
            sampling[key] = value
    return sampling


class Session:
    """J-Moshi loaded once; :meth:`run_file` processes one input, :meth:`run_many` a list."""

    def __init__(self, files: ModelFiles, options: InferOptions | None = None):
        import torch

        self.options = options = options or InferOptions()
        self.files = files
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise PreflightError("CUDA is not available to torch", hint="run on a GPU machine or use --device cpu")
        self.device = torch.device(options.device)
        self.dtype = torch.float16 if options.half else torch.bfloat16

        for label, path in (("LM weights", files.moshi_weight), ("Mimi weights", files.mimi_weight),
                            ("tokenizer", files.tokenizer)):
            if not Path(path).is_file():
                raise CacheError(f"{label} not found: {path}", hint="download the model again")
        lm_config, raw_config, model_type, lm_gen_config = _read_config(files)
        if model_type != "moshi":
            raise UsageError(f"model type {model_type!r} is not supported by jmoshi infer",
                             hint="only moshi-type (dialogue) models are")
        self.model_type = model_type
        self.sampling = resolve_sampling(options, lm_gen_config)

        from moshi.models import LMGen, loaders

        info = loaders.CheckpointInfo(
            Path(files.moshi_weight), Path(files.mimi_weight), Path(files.tokenizer),
            lm_config, raw_config, model_type, lm_gen_config,
        )
        try:
            self.mimi = info.get_mimi(device=self.device)
            self.tokenizer = info.get_text_tokenizer()
            self.lm = info.get_moshi(device=self.device, dtype=self.dtype)
        except torch.cuda.OutOfMemoryError as exc:
            raise PreflightError("not enough GPU memory to load the model",
                                 hint="close other GPU programs or use a smaller variant") from exc
        except Exception as exc:  # noqa: BLE001 - safetensors, torch and sentencepiece raise their own
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CacheError(f"cannot load the model: {msg[:300]}",
                             hint="the model files may be incomplete or corrupt: download them again") from exc
        if self.lm.condition_provider is not None:
            raise UsageError("this model needs conditioning, which jmoshi infer does not support")
        try:
            self.lm_gen = LMGen(self.lm, **self.sampling)
        except TypeError as exc:
            raise CacheError(f"bad lm_gen_config in {files.config}: {exc}", hint="download the model again") from exc
        self.sample_rate = int(self.mimi.sample_rate)
        self.frame_size = int(self.mimi.sample_rate / self.mimi.frame_rate)
        if (self.sample_rate, self.frame_size) != (SAMPLE_RATE, FRAME_SIZE):
            raise CacheError(f"unexpected Mimi rate {self.sample_rate} Hz / frame {self.frame_size}")
        self.max_delay = int(self.lm_gen.max_delay)
        # Longest segment the LM attends to in full (None: no limit).
        self.max_frames: int | None = int(self.lm.context) if self.lm.context else None
        self.mimi.streaming_forever(1)
        self.lm_gen.streaming_forever(1)

    _PER_FILE_OPTIONS = ("channel", "seed")

    def configure(self, **changes: Any) -> None:
        """Change the per-file options (``channel``, ``seed``) for the next files. Device, dtype
        and sampling are fixed when the model is loaded: they need a new Session."""
        import dataclasses

        fixed = sorted(set(changes) - set(self._PER_FILE_OPTIONS))
        if fixed:
            raise ValueError(f"cannot change {', '.join(fixed)} on a loaded Session")
        self.options = dataclasses.replace(self.options, **changes)

    # -- description ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What the session runs with, for a header or a --json dump."""
        import torch

        return {
            "device": str(self.device),
            "dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(self.dtype, str(self.dtype)),
            "context_frames": self.max_frames,
            "context_s": None if self.max_frames is None else self.max_frames * FRAME_S,
            "max_delay": self.max_delay,
            "sampling": dict(self.sampling),
            "seed": self.options.seed,
            "channel": self.options.channel,
        }

    # -- the model loop ------------------------------------------------------------------------

    def _generate(self, pcm: np.ndarray, on_step: Callable[[], None] | None) -> tuple[np.ndarray, list[int]]:
        """One conversation from a fresh state: ``pcm`` holds whole frames; returns (J-Moshi's pcm
        of the same length, one text id per frame)."""
        import torch

        frames = pcm.shape[0] // self.frame_size
        self.mimi.reset_streaming()
        self.lm_gen.reset_streaming()
        x = torch.from_numpy(pcm).to(self.device)[None, None]
        silence = torch.zeros(1, 1, self.frame_size, device=self.device)
        out_pcm: list[torch.Tensor] = []
        text_ids: list[int] = []
        first = self.mimi.encode(x[..., : self.frame_size])
        # Step 0 fills position 0 with the initial tokens; step k >= 1 gets frame k - 1 (silence past
        # the end) and returns position k + 1 - max_delay, i.e. output frame k - max_delay.
        for step in range(frames + self.max_delay):
            index = step - 1
            if index <= 0:
                codes = first  # frame 0 is encoded once and fed to steps 0 and 1
            elif index < frames:
                codes = self.mimi.encode(x[..., index * self.frame_size:(index + 1) * self.frame_size])
            else:
                codes = self.mimi.encode(silence)
            tokens = self.lm_gen.step(codes)
            if tokens is None:
                continue
            out_pcm.append(self.mimi.decode(tokens[:, 1:])[0, 0].float().cpu())
            text_ids.append(int(tokens[0, 0, 0].item()))
            if on_step is not None:
                on_step()
        if len(out_pcm) != frames:  # a model whose delays break the accounting above
            raise RuntimeError(f"expected {frames} output frames, got {len(out_pcm)}")
        return torch.cat(out_pcm).numpy(), text_ids

    def _rng(self):
        import torch

        if self.options.seed is None:
            return contextlib.nullcontext()
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    # -- one file ---------------------------------------------------------------------------

    def run_file(self, src: Path, out_dir: Path, on_frame: OnFrame | None = None,
                 name: str | None = None) -> FileResult:
        """Process one input and write its three outputs to ``out_dir`` (which must exist).

        ``name`` is the outputs' base name (default: the source's stem). ``on_frame(done, total)``
        is called with 0 first and after each 80 ms frame. Expected failures come back as
        ``FileResult(ok=False)``; only unexpected ones raise.
        """
        import torch

        src = Path(src)
        start = time.perf_counter()
        result = FileResult(source=src, ok=False)
        try:
            audio = audio_io.read_audio(src)
        except audio_io.AudioReadError as exc:
            result.error = f"cannot read {src}: {exc}"
            result.compute_s = time.perf_counter() - start
            return result
        result.audio_s = audio.duration_s
        result.sample_rate = audio.sample_rate
        mono, used = audio_io.pick_channel(audio.pcm, self.options.channel)
        result.channel = used
        user = audio_io.resample(mono, audio.sample_rate, self.sample_rate)
        frames = -(-user.shape[0] // self.frame_size)
        padded = np.zeros(frames * self.frame_size, dtype=np.float32)
        padded[: user.shape[0]] = user
        result.frames = frames

        seg_len = frames if self.max_frames is None else min(frames, self.max_frames)
        bounds = [(s, min(s + seg_len, frames)) for s in range(0, frames, seg_len)]
        result.segments = len(bounds)
        notes = []
        if audio.channels > 1:
            notes.append(f"{audio.channels} channels, used {used}")
        if len(bounds) > 1:
            notes.append(
                f"longer than the model's context ({self.max_frames} frames = {self.max_frames * FRAME_S:g} s):"
                f" split into {len(bounds)} segments, J-Moshi starts afresh at each"
            )
        result.note = "; ".join(notes) or None

        done = 0
        if on_frame is not None:
            on_frame(0, frames)

        def step_done() -> None:
            nonlocal done
            done += 1
            if on_frame is not None:
                on_frame(done, frames)

        out = np.zeros_like(padded)
        text_ids: list[int] = []
        try:
            with torch.no_grad(), self._rng():
                if self.options.seed is not None:
                    torch.manual_seed(self.options.seed)
                for a, b in bounds:
                    seg_pcm, seg_ids = self._generate(padded[a * self.frame_size:b * self.frame_size], step_done)
                    out[a * self.frame_size:b * self.frame_size] = seg_pcm
                    text_ids.extend(seg_ids)
        except torch.cuda.OutOfMemoryError:
            result.error = f"{src}: out of GPU memory"
            result.compute_s = time.perf_counter() - start
            return result

        pieces = []
        for frame, tid in enumerate(text_ids):
            if tid in SKIPPED_TEXT_IDS or not (0 <= tid < self.tokenizer.get_piece_size()):
                continue
            if self.tokenizer.is_control(tid):
                continue
            pieces.append({"frame": frame, "time_s": round(frame * FRAME_S, 3), "id": tid,
                           "piece": self.tokenizer.id_to_piece(tid)})
        text = join_pieces(p["piece"] for p in pieces)
        result.text = text
        transcript = {
            "source": str(src),
            "sample_rate": self.sample_rate,
            "frame_s": FRAME_S,
            "frames": frames,
            "input_s": round(audio.duration_s, 6),
            "input_sample_rate": audio.sample_rate,
            "channel": used,
            "alignment": "piece at frame t: J-Moshi's text for output frame t, which starts at "
                         "t * frame_s in .jmoshi.wav and .dialogue.wav, while the user's frame t plays",
            "segments": [{"start_frame": a, "frames": b - a} for a, b in bounds],
            "sampling": {**self.sampling, "seed": self.options.seed},
            "pieces": pieces,
            "text": text,
        }

        paths = output_paths(out_dir, name or src.stem)
        try:
            audio_io.write_wav(paths["jmoshi"], out, self.sample_rate)
            audio_io.write_wav(paths["dialogue"], np.stack([padded, out]), self.sample_rate)
            _write_text_atomic(paths["transcript"],
                               json.dumps(transcript, ensure_ascii=False, indent=2) + "\n")
        except OSError as exc:
            for p in paths.values():
                with contextlib.suppress(OSError):
                    p.unlink()
            result.error = f"cannot write the outputs of {src} to {out_dir}: {exc.strerror or exc}"
            result.compute_s = time.perf_counter() - start
            return result

        result.ok = True
        result.outputs = paths
        result.compute_s = time.perf_counter() - start
        result.rtf = result.compute_s / result.audio_s if result.audio_s > 0 else 0.0
        return result

    # -- several files ---------------------------------------------------------------------------

    def run_many(self, sources: list[Path], out_dir: Path,
                 on_file: Callable[[int, int, Path], None] | None = None,
                 on_frame: OnFrame | None = None,
                 on_result: Callable[[FileResult], None] | None = None) -> list[FileResult]:
        """Process every source in order; one failing file never stops the others.

        ``on_file(index, count, source)`` before each file, ``on_frame(done, total)`` during it,
        ``on_result(result)`` after it. Unexpected errors are caught per file too and reported as
        ``internal error`` (KeyboardInterrupt still stops the run).
        """
        out_dir = prepare_out_dir(out_dir)
        names = output_names(list(sources))
        results = []
        for i, src in enumerate(sources):
            if on_file is not None:
                on_file(i, len(sources), src)
            start = time.perf_counter()
            try:
                result = self.run_file(src, out_dir, on_frame=on_frame, name=names[src])
            except JMoshiError as exc:
                result = FileResult(source=src, ok=False, error=f"{src}: {exc.message}",
                                    compute_s=time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - keep the other files' results
                result = FileResult(source=src, ok=False,
                                    error=f"{src}: internal error: {type(exc).__name__}: {exc}",
                                    compute_s=time.perf_counter() - start)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def expected_frames(samples: int, sample_rate: int) -> int:
    """Frames (and output length / 1920) for an input of ``samples`` at ``sample_rate``."""
    return -(-audio_io.resampled_length(samples, sample_rate, SAMPLE_RATE) // FRAME_SIZE)


@dataclass(frozen=True)
class InferRequest:
    """One `jmoshi infer` run: what to read, where to write, which model, how to sample."""

    inputs: list[Path]
    out_dir: Path
    variant: str | None = None
    revision: str | None = None
    offline: bool = False
    moshi_weight: Path | None = None
    options: InferOptions = field(default_factory=InferOptions)


@dataclass
class InferHooks:
    """How the caller shows what happens; the defaults show nothing."""

    on_note: Callable[[str], None] = lambda note: None
    watch_download: Any = None  # artifacts.WatchFactory
    loading: Callable[[str], ContextManager[Any]] = lambda what: contextlib.nullcontext()
    # progress(count) -> a context manager with file(index, count, source), frame(done, total), result(r)
    progress: Callable[[int], ContextManager[Any]] | None = None


def run(request: InferRequest, hooks: InferHooks | None = None) -> list[FileResult]:
    """Check inputs, output folder and device (seconds), make the model local, load it once, process
    every input. Raises JMoshiError for problems of the whole run; per-file problems are in the results.
    """
    from . import artifacts, preflight
    from .variants import load_catalogue

    hooks = hooks or InferHooks()
    options = request.options
    sources = collect_inputs(request.inputs, on_warning=hooks.on_note)
    prepare_out_dir(request.out_dir)
    catalogue = load_catalogue()
    chosen = catalogue.get(request.variant)
    weight = preflight.check_moshi_weight(request.moshi_weight)
    device = preflight.check_device(options.device, chosen.vram_min_gb, chosen.name)
    for note in device.notes:
        hooks.on_note(note)
    if device.half:
        options = replace(options, half=True)
    _, files = artifacts.ensure_local(catalogue, chosen, request.revision, offline=request.offline, web_ui=False,
                                      moshi_weight=weight, watch=hooks.watch_download, on_note=hooks.on_note)
    if options.channel == "left":
        hooks.on_note("the user is the left channel of stereo inputs (--channel right|mix to change)")
    with hooks.loading(f"loading {chosen.name} on {options.device}"):
        session = Session(files, options)
    if hooks.progress is None:
        return session.run_many(sources, request.out_dir)
    with hooks.progress(len(sources)) as view:
        return session.run_many(sources, request.out_dir, on_file=view.file, on_frame=view.frame,
                                on_result=view.result)


def summarize(results: list[FileResult]) -> dict[str, Any]:
    """Totals for the summary line: files, ok, failed, audio_s, compute_s, rtf (compute / audio)."""
    ok = [r for r in results if r.ok]
    audio_s = sum(r.audio_s for r in ok)
    compute_s = sum(r.compute_s for r in ok)
    return {
        "files": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "audio_s": audio_s,
        "compute_s": compute_s,
        "rtf": compute_s / audio_s if audio_s > 0 else 0.0,
    }
