"""N conversations on one loaded moshi, stepped together (moshi >= 0.2.5: streaming_forever, reset and
exec masks, `LMGen(support_out_of_sync=True)`; Kyutai's rust/moshi-server/batched_asr.py drives Mimi and
LMGen the same way).

A tick steps every open slot whose next 80 ms frame has arrived; the others are masked for that step
(their Mimi and LM state do not move, so their stream stays aligned: a late slot is stepped when its
audio comes, never fed invented input). Opening a slot resets that slot's state only. Per slot, the
first frame goes through Mimi's encoder and the encoder is then reset, as moshi.server does for each
conversation (the frame's codes carry the encoder's left padding).

Sampling: moshi draws the whole batch from torch's one generator. With a seed, each slot draws from its
own generator instead, seeded when the slot is opened (upstream/moshi_sampling.py), so a seeded
conversation says the same alone or beside others; without one, the batch shares torch's generator.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ..audio_io import FRAME_SIZE
from .base import NOTHING_YET, Facts, Said, SlotsFull

__all__ = ["BatchedEngine", "Said", "SlotsFull"]

SAMPLING_KEYS = ("temp", "temp_text", "top_k", "top_k_text")


class BatchedEngine:
    def __init__(self, mimi: Any, lm: Any, slots: int, *, seed: int | None = None, tokenizer: Any = None,
                 **sampling: Any):
        import torch
        from moshi.models import LMGen

        self.torch = torch
        self.mimi, self.slots, self.seed = mimi, slots, seed
        parameter = next(iter(lm.parameters()))
        self.device = parameter.device
        self.lm_gen = LMGen(lm, support_out_of_sync=True, **sampling)
        self.generators: list[Any] = [None] * slots  # with a seed: each slot's own, seeded when it opens
        if seed is not None:
            from ..upstream import moshi_sampling

            moshi_sampling.install()
        self.facts = Facts(tokenizer, int(self.lm_gen.max_delay),
                           {key: getattr(self.lm_gen, key, None) for key in SAMPLING_KEYS},
                           str(self.device), str(parameter.dtype).removeprefix("torch."), _runtime())
        # Streaming state for N slots, held until `shutdown` (the model can then serve another engine).
        self._streaming = contextlib.ExitStack()
        self._streaming.enter_context(self.mimi.streaming(slots))
        self._streaming.enter_context(self.lm_gen.streaming(slots))
        self.open_slots: set[int] = set()
        self.first: set[int] = set()  # slots whose first frame is still to come
        self.pending: dict[int, np.ndarray] = {}
        self.replay_first: set[int] = set()  # not live: slots whose first frame's codes are to be stepped twice
        self.replay: dict[int, Any] = {}  # ... and those codes, for their next step
        self.codes_shape: tuple[int, ...] = (slots, 0, 1)  # of Mimi's codes, known from the first encode

    def shutdown(self) -> None:
        self._streaming.close()

    def __enter__(self) -> BatchedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _mask(self, slots: set[int]) -> Any:
        mask = self.torch.zeros(self.slots, dtype=self.torch.bool, device=self.device)
        mask[list(slots)] = True
        return mask

    def open(self, *, live: bool = True, generator: Any = None) -> int:
        """A free slot, its state reset (the others untouched); SlotsFull when none is free.

        live: a conversation as moshi.server runs it (Mimi's encoder reset after the first frame). Not
        live: as `jmoshi infer` (and moshi.run_inference) runs a file: the encoder runs unbroken and the
        first frame's codes are stepped twice, the second time at the next step, without a feed
        (infer/generation.py, Alignment). generator: the slot samples from it (else, with the engine's
        seed, from one seeded now; else from torch's)."""
        free = [slot for slot in range(self.slots) if slot not in self.open_slots]
        if not free:
            raise SlotsFull(f"all {self.slots} slots are in a conversation")
        slot = free[0]
        reset = self._mask({slot})
        self.mimi.reset_streaming(reset)
        self.lm_gen.reset_streaming(reset)
        if generator is None and self.seed is not None:
            generator = self.torch.Generator(device=self.device).manual_seed(self.seed)
        if generator is not None:
            from ..upstream import moshi_sampling

            moshi_sampling.install()
        self.generators[slot] = generator
        self.open_slots.add(slot)
        (self.first if live else self.replay_first).add(slot)
        return slot

    def close(self, slot: int) -> None:
        """The slot is free again; its state stays until the next open resets it (it costs no step)."""
        self.open_slots.discard(slot)
        self.first.discard(slot)
        self.replay_first.discard(slot)
        self.replay.pop(slot, None)
        self.pending.pop(slot, None)

    def feed(self, slot: int, pcm: np.ndarray) -> None:
        """The slot's next 80 ms of the user's audio (1920 float32 samples at 24 kHz)."""
        if slot not in self.open_slots:
            raise ValueError(f"slot {slot} is not open")
        if slot in self.pending or slot in self.replay:
            raise ValueError(f"slot {slot} already has a frame waiting for the next step")
        frame = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if frame.shape[0] != FRAME_SIZE:
            raise ValueError(f"a frame is {FRAME_SIZE} samples, not {frame.shape[0]}")
        self.pending[slot] = frame

    def step(self) -> dict[int, Said]:
        """One tick: every slot with a frame waiting is stepped; what each gave back."""
        ready = set(self.pending) | set(self.replay)
        if not ready:
            return {}
        torch = self.torch
        with torch.no_grad():
            codes = self._encode(ready)
            with self._sampling(ready):
                tokens = self.lm_gen.step(codes)
            return self._decode(ready, tokens)

    def _sampling(self, ready: set[int]) -> Any:
        if all(self.generators[s] is None for s in ready):
            return contextlib.nullcontext()
        from ..upstream import moshi_sampling

        return moshi_sampling.per_slot([self.generators[s] if s in ready else None for s in range(self.slots)])

    def _encode(self, ready: set[int]) -> Any:
        """The codes each ready slot steps on: its frame through Mimi, or its first frame's codes again."""
        torch = self.torch
        heard = set(self.pending)
        replayed = {slot: self.replay.pop(slot) for slot in ready - heard}
        self.lm_gen.set_exec_mask(self._mask(ready))
        if heard:
            batch = np.zeros((self.slots, 1, FRAME_SIZE), dtype=np.float32)
            for slot in heard:
                batch[slot, 0] = self.pending.pop(slot)
            self.mimi.set_exec_mask(self._mask(heard))
            codes = self.mimi.encode(torch.from_numpy(batch).to(self.device))
            self.codes_shape = tuple(codes.shape)
        else:
            codes = torch.zeros(self.codes_shape, dtype=torch.long, device=self.device)
        for slot, again in replayed.items():
            codes[slot] = again
        for slot in heard & self.replay_first:
            self.replay[slot] = codes[slot].clone()
        self.replay_first -= heard
        starting = heard & self.first
        if starting:
            # As moshi.server after a conversation's first frame: that slot's encoder starts again.
            self.mimi.reset_streaming(self._mask(starting))
            self.first -= starting
        return codes

    def _decode(self, ready: set[int], tokens: Any) -> dict[int, Said]:
        torch = self.torch
        valid = (tokens[:, 1:, 0] >= 0).all(dim=1) & self._mask(ready)
        said = {slot: NOTHING_YET for slot in ready}
        if not bool(valid.any()):
            return said
        self.mimi.set_exec_mask(valid)
        audio = torch.where(valid[:, None, None], tokens[:, 1:], torch.zeros_like(tokens[:, 1:]))
        pcm = self.mimi.decode(audio).float().cpu().numpy()
        for slot in ready:
            if bool(valid[slot]):
                said[slot] = Said(pcm[slot, 0], int(tokens[slot, 0, 0]), tokens[slot, 1:, 0].cpu().numpy())
        return said


def _runtime() -> dict:
    from ..runtime import versions

    return versions(("moshi", "torch", "sphn", "aiohttp", "jmoshi"))
