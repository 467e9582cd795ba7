"""What `jmoshi analyze` reads: stereo dialogue files, from the paths given on the command line.

A path may be:

- a file: analysed as it is (any sample rate from 8 to 384 kHz; decoding decides whether it is audio);
- a `serve --record` session folder: its ``dialogue.wav``;
- any other folder: searched recursively for session ``dialogue.wav`` files and `infer`'s
  ``*.dialogue.wav``; when it holds neither, every audio file in it (a corpus of stereo recordings,
  e.g. human dialogues for ``--against``). Hidden files and folders are skipped.

A path that does not exist, or a folder with nothing to analyse, is a usage problem (exit 2); a file
that cannot be analysed (not audio, empty, not two channels, a sample rate or length past the
reader's limits in :mod:`jmoshi_cli.audio_io`) is a failure (exit 1). Either way the other paths are
analysed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..audio_io import AUDIO_EXTENSIONS, Audio, AudioReadError, read_audio
from ..errors import JMoshiError, UsageError
from ..infer.inputs import OUTPUT_SUFFIXES
from ..recording.format import DIALOGUE


class DialogueError(JMoshiError):
    """A file that is not a two-speaker recording (one channel, or more than two)."""


@dataclass(frozen=True)
class Problem:
    """A path that gave no figures, and why: a one-line message and the exit code it stands for."""

    path: Path
    message: str
    exit_code: int


def collect(paths: list[Path]) -> tuple[list[Path], list[Problem]]:
    """The files to analyse, in the order given (each once), and the paths that gave none."""
    files: dict[Path, Path] = {}
    problems = []
    for path in map(Path, paths):
        try:
            found = _expand(path)
        except UsageError as exc:
            problems.append(Problem(path, exc.message, exc.exit_code))
            continue
        for file in found:
            files.setdefault(file.resolve(), file)
    return list(files.values()), problems


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        if (path / DIALOGUE).is_file():
            return [path / DIALOGUE]
        found = _dialogues_in(path) or _audio_in(path)
        if not found:
            raise UsageError(f"nothing to analyse in {path}: no {DIALOGUE}, *{OUTPUT_SUFFIXES['dialogue']} or "
                             "audio file")
        return found
    if path.exists():
        return [path]
    raise UsageError(f"no such file or folder: {path}")


def _walk(folder: Path):
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(root) / name


def _dialogues_in(folder: Path) -> list[Path]:
    suffix = OUTPUT_SUFFIXES["dialogue"]
    return sorted(p for p in _walk(folder) if p.name == DIALOGUE or p.name.lower().endswith(suffix))


def _audio_in(folder: Path) -> list[Path]:
    return sorted(p for p in _walk(folder) if p.suffix.lower() in AUDIO_EXTENSIONS)


def read_dialogue(path: Path) -> Audio:
    """Decode a stereo file; AudioReadError or DialogueError (one line each, naming the file) if it is not one.

    An implausible rate or length is refused from the header, before the samples are decoded.
    """
    try:
        audio = read_audio(path)
    except AudioReadError as exc:
        raise AudioReadError(f"{path}: {exc.one_line()}") from exc
    if audio.channels != 2:
        raise DialogueError(f"{path}: {audio.channels} channel(s); analyze needs a stereo file, one speaker per "
                            "channel (user and J-Moshi)")
    return audio
