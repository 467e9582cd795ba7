"""`jmoshi infer --batch N`: N input files at a time through one loaded model, each in a slot of the
batched engine (engine/torch_batched.py), run exactly as one file alone is (generation.py, Alignment):
the encoder runs over the input unbroken, the first frame's codes are stepped twice, silence follows
the input until its last output frame is out, and J-Moshi starts afresh at each segment of a long
input. A file that is done frees its slot for the next one at once. With a seed, each file samples
from its own generator, seeded at its start, as one file alone does from torch's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from ..audio_io import FRAME_SIZE


@dataclass
class Job:
    """One input and what has come out of it so far."""

    key: Any  # the caller's: which file this is
    pcm: np.ndarray  # the user's audio, whole frames at 24 kHz
    segments: list[tuple[int, int]]
    seed: int | None = None
    out: np.ndarray = field(init=False)
    text_ids: list[int] = field(default_factory=list)
    compute_s: float = 0.0  # this job's share of each step it took part in
    segment: int = 0
    steps: int = 0  # taken in the current segment
    said: int = 0  # output frames of the current segment
    generator: Any = None

    def __post_init__(self) -> None:
        self.out = np.zeros_like(self.pcm)

    @property
    def bounds(self) -> tuple[int, int]:
        return self.segments[self.segment]

    def next_input(self, silence: np.ndarray) -> np.ndarray | None:
        """The frame to feed at this step; None at step 1, where the first frame's codes are stepped again."""
        if self.steps == 1:
            return None
        a, b = self.bounds
        index = 0 if self.steps == 0 else self.steps - 1
        if index >= b - a:
            return silence
        return self.pcm[(a + index) * FRAME_SIZE:(a + index + 1) * FRAME_SIZE]

    def took(self, said: Any) -> bool:
        """One step's result for this job; True when its current segment is complete."""
        self.steps += 1
        a, b = self.bounds
        if said is not None and said.pcm is not None:
            position = a + self.said
            self.out[position * FRAME_SIZE:(position + 1) * FRAME_SIZE] = said.pcm
            self.text_ids.append(int(said.text_id))
            self.said += 1
        if self.said == b - a:
            return True
        if self.steps > (b - a) + 64:  # a model whose delays break this accounting
            raise RuntimeError(f"expected {b - a} output frames, got {self.said} after {self.steps} steps")
        return False


def generate_many(engine: Any, jobs: Iterable[Job]) -> Iterator[Job]:
    """Run every job, as many at once as the engine has slots; each is yielded as soon as it is done."""
    import torch

    waiting = iter(jobs)
    running: dict[int, Job] = {}
    silence = np.zeros(FRAME_SIZE, dtype=np.float32)

    def start(job: Job) -> None:
        if job.seed is not None and job.generator is None:
            job.generator = torch.Generator(device=engine.device).manual_seed(job.seed)
        running[engine.open(live=False, generator=job.generator)] = job

    def fill() -> None:
        while len(running) < engine.slots:
            job = next(waiting, None)
            if job is None:
                return
            start(job)

    fill()
    while running:
        for slot, job in running.items():
            frame = job.next_input(silence)
            if frame is not None:
                engine.feed(slot, frame)
        began = time.perf_counter()
        said = engine.step()
        share = (time.perf_counter() - began) / len(running)
        for slot, job in list(running.items()):
            job.compute_s += share
            if not job.took(said.get(slot)):
                continue
            engine.close(slot)
            del running[slot]
            if job.segment + 1 < len(job.segments):
                job.segment, job.steps, job.said = job.segment + 1, 0, 0
                start(job)  # J-Moshi starts afresh at each segment, in a fresh slot
            else:
                yield job
        fill()
