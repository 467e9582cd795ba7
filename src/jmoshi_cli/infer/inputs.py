"""What `jmoshi infer` reads and where its results go: the input files, the user's audio as the model
hears it, the output folder and each input's output names.

Lengths. An input is resampled to 24 kHz (``ceil(n * 24000 / rate)`` samples, no delay) and padded
with silence to whole 80 ms frames: ``frames = ceil(samples_24k / 1920)``. Both output wav files hold
exactly ``frames * 1920`` samples.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import audio_io
from ..audio_io import FRAME_SIZE, SAMPLE_RATE
from ..errors import UsageError

OUTPUT_SUFFIXES = {
    "jmoshi": ".jmoshi.wav",
    "dialogue": ".dialogue.wav",
    "transcript": ".transcript.json",
}


@dataclass(frozen=True)
class UserAudio:
    """One input as J-Moshi hears it: ``pcm`` is the chosen channel at 24 kHz, ``frames * 1920`` samples."""

    pcm: np.ndarray
    frames: int
    channel: str  # left / right / mix / mono
    input_rate: int
    input_s: float
    input_channels: int


def load_user(src: Path, channel: str) -> UserAudio:
    """Read ``src``, keep the user's channel, resample to 24 kHz, pad to whole frames.

    Raises :class:`~jmoshi_cli.audio_io.AudioReadError` when the file cannot be decoded, is empty, or
    has a sample rate or length past the reader's limits (refused before anything is resampled); its
    message then carries the hint too, as `infer` reports each file on one line.
    """
    try:
        audio = audio_io.read_audio(src)
    except audio_io.AudioReadError as exc:
        raise audio_io.AudioReadError(exc.one_line()) from exc
    mono, used = audio_io.pick_channel(audio.pcm, channel)
    user = audio_io.resample(mono, audio.sample_rate, SAMPLE_RATE)
    frames = expected_frames(audio.samples, audio.sample_rate)
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[: user.shape[0]] = user
    return UserAudio(padded, frames, used, audio.sample_rate, audio.duration_s, audio.channels)


def expected_frames(samples: int, sample_rate: int) -> int:
    """Frames (and output length / 1920) for an input of ``samples`` at ``sample_rate``."""
    return -(-audio_io.resampled_length(samples, sample_rate, SAMPLE_RATE) // FRAME_SIZE)


def _is_own_output(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(OUTPUT_SUFFIXES["jmoshi"]) or name.endswith(OUTPUT_SUFFIXES["dialogue"])


def _audio_in_folder(folder: Path) -> list[Path]:
    """Audio files under ``folder``, recursively, sorted; hidden entries and our own outputs skipped."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or _is_own_output(path):
                continue
            if path.suffix.lower() in audio_io.AUDIO_EXTENSIONS and path.is_file():
                found.append(path)
    return sorted(found)


def _expand(path: Path, on_warning: Callable[[str], None] | None) -> list[Path]:
    if path.is_dir():
        found = _audio_in_folder(path)
        if not found and on_warning is not None:
            on_warning(f"no audio files in {path}")
        return found
    if path.exists():
        return [path]
    raise UsageError(f"no such file or folder: {path}", hint="check the path")


def collect_inputs(paths: Iterable[Path], on_warning: Callable[[str], None] | None = None) -> list[Path]:
    """Expand the command line's paths into the list of files to process.

    A file is kept as given (whatever its extension: decoding decides). A folder is searched
    recursively for ``.wav .flac .mp3 .ogg .oga .opus`` files (any case), in sorted path order,
    skipping hidden files and folders and this command's own ``*.jmoshi.wav`` / ``*.dialogue.wav``.
    The same file given twice is kept once. A path that does not exist raises UsageError (before
    any model is loaded); a folder without audio is reported through ``on_warning``; UsageError
    when nothing at all is left.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("no input given", hint="pass audio files or folders: jmoshi infer talk.wav")
    files: dict[Path, Path] = {}  # resolved -> as given, in order
    for path in paths:
        for found in _expand(path, on_warning):
            files.setdefault(found.resolve(), found)
    if not files:
        where = ", ".join(str(p) for p in paths if p.is_dir())
        raise UsageError(f"no audio files in {where}", hint="supported: " + " ".join(audio_io.AUDIO_EXTENSIONS))
    return list(files.values())


def _names_for_shared_stem(group: list[Path]) -> list[str]:
    """Names for sources sharing a stem: their path below the deepest common folder, joined by ``__``."""
    resolved = [g.resolve() for g in group]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    rel = [r.relative_to(common) for r in resolved]
    stems = ["__".join([*r.parent.parts, r.stem]) for r in rel]
    if len({s.lower() for s in stems}) < len(stems):  # only the extension differs: keep it
        stems = ["__".join([*r.parent.parts, r.name]) for r in rel]
    return stems


def output_names(sources: list[Path]) -> dict[Path, str]:
    """A distinct output base name for each source: its stem, unless several sources share it.

    Sources sharing a stem are named after their path relative to the deepest folder they have in
    common, folders joined with ``__`` (``a/x.wav`` and ``b/x.wav`` -> ``a__x`` and ``b__x``),
    keeping the extension when that is what differs (``x.wav`` / ``x.flac`` -> ``x.wav`` /
    ``x.flac``); a counter settles anything left. Comparison ignores case.
    """
    by_stem: dict[str, list[Path]] = {}
    for src in sources:
        by_stem.setdefault(src.stem.lower(), []).append(src)
    names: dict[Path, str] = {}
    for group in by_stem.values():
        stems = [group[0].stem] if len(group) == 1 else _names_for_shared_stem(group)
        names.update(zip(group, stems, strict=True))
    used: set[str] = set()
    for src in sources:  # settle collisions with other stems (e.g. a literal "a__x.wav"), in order
        name, i = names[src], 2
        while name.lower() in used:
            name, i = f"{names[src]}-{i}", i + 1
        used.add(name.lower())
        names[src] = name
    return names


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    return {key: Path(out_dir) / f"{name}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


def prepare_out_dir(out_dir: Path) -> Path:
    """Create the output folder and check that a file can be written there; UsageError if not."""
    out_dir = Path(out_dir)
    hint = "choose another folder with --out"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}", hint=hint) from exc
    probe = out_dir / f".jmoshi-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise UsageError(f"cannot write to the output folder {out_dir}: {exc.strerror or exc}", hint=hint) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return out_dir
