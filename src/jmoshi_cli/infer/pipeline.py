"""File inference: feed recordings of a user to J-Moshi and save what it answers.

:func:`run` is the whole `jmoshi infer`: check the inputs, the output folder and the device, make the
model local, load it once (:class:`Session`; on the MLX backend through :mod:`~jmoshi_cli.infer.mlx_engine`)
and process every input in turn. For an input
``<stem>.<ext>`` three files are written to the output folder (:mod:`~jmoshi_cli.infer.outputs`):
J-Moshi's voice, a stereo dialogue wav and a timed transcript. Both wav files hold the input's
length rounded up to whole 80 ms frames (:mod:`~jmoshi_cli.infer.inputs`); how the two voices line
up, long inputs, dtype and sampling are described in :mod:`~jmoshi_cli.infer.generation`.

Where the work lives: :mod:`~jmoshi_cli.infer.inputs` (inputs, the user's audio, output names),
:mod:`~jmoshi_cli.infer.generation` (model and loop), :mod:`~jmoshi_cli.transcript` (text),
:mod:`~jmoshi_cli.infer.outputs` (files).

Errors. A file that cannot be read, holds no samples, or whose outputs cannot be written gives a
``FileResult`` with ``ok=False`` and the next file is processed; callers exit non-zero at the end
when any result failed. Problems that concern the whole run (no inputs, output folder not
writable, model files missing or corrupt, no CUDA) raise :class:`~jmoshi_cli.errors.JMoshiError`
subclasses before the model is loaded or while it loads. Nothing here prints.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .. import audio_io, transcript
from ..audio_io import FRAME_S, SAMPLE_RATE
from ..cache.artifacts import ModelFiles
from ..engine.memory import parse_count
from ..errors import JMoshiError
from ..reporter import Reporter
from . import generation, outputs
from .inputs import UserAudio, collect_inputs, load_user, output_names, output_paths, prepare_out_dir
from .options import InferOptions

if TYPE_CHECKING:  # pragma: no cover
    pass

OnFrame = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Options, requests and results
# --------------------------------------------------------------------------------------------


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
    lora: Path | None = None  # a moshi-finetune adapter over the variant (finetune.py)
    backend: str = "auto"  # --backend: auto, torch or mlx (backends.choose)
    batch: str | None = None  # --batch as given: a number or auto; None: one at a time


# --------------------------------------------------------------------------------------------
# One model, many files
# --------------------------------------------------------------------------------------------


def _frame_counter(on_frame: OnFrame | None, total: int) -> generation.OnStep | None:
    """Report 0 of ``total`` now, and one more frame at each call of the function returned."""
    if on_frame is None:
        return None
    on_frame(0, total)
    done = itertools.count(1)
    return lambda: on_frame(next(done), total)


def _note(user: UserAudio, segments: list[tuple[int, int]], max_frames: int | None) -> str | None:
    notes = []
    if user.input_channels > 1:
        notes.append(f"{user.input_channels} channels, used {user.channel}")
    if len(segments) > 1:
        assert max_frames is not None  # segment_bounds splits only under a context limit
        notes.append(f"longer than the model's context ({max_frames} frames = {max_frames * FRAME_S:g} s):"
                     f" split into {len(segments)} segments, J-Moshi starts afresh at each")
    return "; ".join(notes) or None


class Generating(Protocol):
    """What a Session needs of a loaded model: generation.Model (PyTorch) or mlx_engine.MlxModel."""

    tokenizer: Any
    sampling: dict[str, Any]
    max_frames: int | None

    @property
    def batch(self) -> int:
        """Inputs it runs at once (> 1: generation.Model with the batched engine)."""

    def generate(self, pcm: Any, segments: list[tuple[int, int]], seed: int | None,
                 on_step: generation.OnStep | None = None) -> tuple[Any, list[int]]: ...


@dataclass
class Session:
    """J-Moshi loaded once, and the run's per-file options (channel, seed)."""

    model: Generating
    options: InferOptions

    @classmethod
    def load(cls, files: ModelFiles, options: InferOptions | None = None, quiet: bool = True) -> Session:
        """Load the model for ``options`` (device, dtype, sampling); see :func:`generation.load_model`."""
        options = options or InferOptions()
        model = generation.load_model(files, options.device, options.half, options.sampling.overrides(), quiet,
                                      batch=options.batch or 1)
        return cls(model, options)

    def run_file(self, src: Path, out_dir: Path, on_frame: OnFrame | None = None,
                 name: str | None = None) -> FileResult:
        """Process one input and write its three outputs to ``out_dir`` (which must exist).

        ``name`` is the outputs' base name (default: the source's stem). ``on_frame(done, total)``
        is called with 0 first and after each 80 ms frame. Every failure comes back as
        ``FileResult(ok=False)`` (KeyboardInterrupt still stops the run).
        """
        src = Path(src)
        result = FileResult(source=src, ok=False)
        start = time.perf_counter()
        try:
            self._process(result, Path(out_dir), name or src.stem, on_frame)
        except audio_io.AudioReadError as exc:
            result.error = f"cannot read {src}: {exc.message}"
        except JMoshiError as exc:
            result.error = f"{src}: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - one file's unexpected failure must not lose the others' results
            result.error = f"{src}: internal error: {type(exc).__name__}: {exc}"
        finally:
            result.compute_s = time.perf_counter() - start
        if result.ok and result.audio_s > 0:
            result.rtf = result.compute_s / result.audio_s
        return result

    def _process(self, result: FileResult, out_dir: Path, name: str, on_frame: OnFrame | None) -> None:
        user, segments = self._read(result)
        pcm, text_ids = self.model.generate(user.pcm, segments, self.options.sampling.seed,
                                            _frame_counter(on_frame, user.frames))
        self._write(result, user, segments, pcm, text_ids, out_dir, name)

    def _read(self, result: FileResult) -> tuple[UserAudio, list[tuple[int, int]]]:
        user = load_user(result.source, self.options.channel)
        result.audio_s, result.sample_rate, result.channel, result.frames = (
            user.input_s, user.input_rate, user.channel, user.frames)
        segments = generation.segment_bounds(user.frames, self.model.max_frames)
        result.segments, result.note = len(segments), _note(user, segments, self.model.max_frames)
        return user, segments

    def _write(self, result: FileResult, user: UserAudio, segments: list[tuple[int, int]], pcm: Any,
               text_ids: list[int], out_dir: Path, name: str) -> None:
        pieces = transcript.timed_pieces(text_ids, self.model.tokenizer, FRAME_S)
        doc = transcript.document(result.source, user, segments,
                                  {**self.model.sampling, "seed": self.options.sampling.seed}, pieces,
                                  sample_rate=SAMPLE_RATE, frame_s=FRAME_S)
        paths = output_paths(out_dir, name)
        outputs.write_outputs(paths, user.pcm, pcm, doc)
        result.ok, result.outputs, result.text = True, paths, doc["text"]

    def run_many(self, sources: list[Path], out_dir: Path,
                 on_file: Callable[[int, int, Path], None] | None = None,
                 on_frame: OnFrame | None = None,
                 on_result: Callable[[FileResult], None] | None = None) -> list[FileResult]:
        """Process every source in order into ``out_dir`` (created); one failing file never stops the others.

        ``on_file(index, count, source)`` before each file, ``on_frame(done, total)`` during it,
        ``on_result(result)`` after it.
        """
        out_dir = prepare_out_dir(out_dir)
        names = output_names(list(sources))
        if self.model.batch > 1:
            return self._run_batched(list(sources), out_dir, names, on_file, on_result)
        results = []
        for i, src in enumerate(sources):
            if on_file is not None:
                on_file(i, len(sources), src)
            results.append(self.run_file(src, out_dir, on_frame=on_frame, name=names[src]))
            if on_result is not None:
                on_result(results[-1])
        return results


    def _run_batched(self, sources: list[Path], out_dir: Path, names: dict[Path, str],
                     on_file: Callable[[int, int, Path], None] | None,
                     on_result: Callable[[FileResult], None] | None) -> list[FileResult]:
        """run_many with the batched engine: files start as slots free up and are written as they finish."""
        from . import batched

        results = [FileResult(source=src, ok=False) for src in sources]
        read: dict[int, tuple[UserAudio, list[tuple[int, int]]]] = {}

        def done(index: int) -> None:
            if on_result is not None:
                on_result(results[index])

        def jobs():
            for index, src in enumerate(sources):
                if on_file is not None:
                    on_file(index, len(sources), src)
                try:
                    read[index] = user, segments = self._read(results[index])
                except (audio_io.AudioReadError, JMoshiError) as exc:
                    results[index].error = f"cannot read {src}: {exc.message}"
                    done(index)
                    continue
                yield batched.Job(index, user.pcm, segments, self.options.sampling.seed)

        try:
            for job in batched.generate_many(self.model.engine, jobs()):  # type: ignore[attr-defined]
                self._finish_batched(results[job.key], read.pop(job.key), job, out_dir, names)
                done(job.key)
        except Exception as exc:  # noqa: BLE001 - the files still in the batch fail together; the others stand
            for index in read:
                results[index].error = f"{sources[index]}: internal error: {type(exc).__name__}: {exc}"
                done(index)
        return results

    def _finish_batched(self, result: FileResult, read: tuple[UserAudio, list[tuple[int, int]]], job: Any,
                        out_dir: Path, names: dict[Path, str]) -> None:
        user, segments = read
        try:
            self._write(result, user, segments, job.out, job.text_ids, out_dir, names[result.source])
        except JMoshiError as exc:
            result.error = f"{result.source}: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - as run_file: one file's failure does not lose the others
            result.error = f"{result.source}: internal error: {type(exc).__name__}: {exc}"
        result.compute_s = job.compute_s
        if result.ok and result.audio_s > 0:
            result.rtf = result.compute_s / result.audio_s


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def run(request: InferRequest, report: Reporter | None = None) -> list[FileResult]:
    """Check inputs, output folder and device (seconds), make the model local, load it once, process
    every input. Raises JMoshiError for problems of the whole run; per-file problems are in the results.
    """
    from .. import backends
    from ..console import settings
    from ..model import precision
    from ..model.preparation import ModelRequest

    report = report or Reporter()
    backend = backends.choose(request.backend)
    options = request.options
    wanted = parse_count(request.batch, "--batch")
    backend.refuse(backends.Features(lora=request.lora is not None, half=options.half, device=options.device,
                                     conversations="--batch" if wanted not in (1, None) else None))
    device = backend.device(options.device)
    backend.for_infer(device)
    asked = precision.parse(options.quantize, backend.precisions)
    sources = collect_inputs(request.inputs, on_warning=report.note)
    prepare_out_dir(request.out_dir)
    model = backend.prepare(ModelRequest(request.variant, request.revision, request.moshi_weight, request.lora, asked,
                                         device, options.half, request.offline),
                            web_ui=False, watch=report.watch_download, on_note=report.note)
    options = replace(options, half=model.half, batch=_batch(wanted, device, model, len(sources), report))
    if options.channel == "left":
        report.note("the user is the left channel of stereo inputs (--channel right|mix to change)")
    with report.loading(f"loading {model.variant.name} ({model.precision.value}) with {backend.name} on {device}"):
        # What moshi prints while loading is for those who asked to see details (--verbose, JMOSHI_DEBUG).
        session = Session(backend.load_for_infer(model.files, options, device, quiet=not settings.show_tracebacks),
                          options)
    progress = report.progress(len(sources))
    if progress is None:
        return session.run_many(sources, request.out_dir)
    with progress as view:
        return session.run_many(sources, request.out_dir, on_file=view.file, on_frame=view.frame,
                                on_result=view.result)


def _batch(wanted: int | None, device: str, model: Any, inputs: int, report: Reporter) -> int:
    """How many inputs at once: as asked, or (auto) as many as fit beside the model; never more than there are."""
    from .. import runtime
    from ..engine.memory import room_for

    if wanted is not None:
        return max(1, min(wanted, inputs))
    if inputs == 1 or not device.startswith("cuda") or not runtime.detect().has_slot_masks:
        return 1
    room = room_for(device, model, "--batch")
    count = min(room.count, inputs)
    if count > 1:
        report.note(replace(room, count=count).says("--batch", "inputs at once"))
    return count


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
