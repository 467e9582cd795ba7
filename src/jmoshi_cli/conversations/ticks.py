"""The tick: every slot's next frame gathered and stepped together, on the model's one thread.

Browsers send their 80 ms frames at different phases. Stepping at every arrival would multiply the
steps (on a GPU a step of one slot costs nearly what a step of sixteen does), so a tick waits, from
the first frame that arrives, until every talking slot has one or `GATHER_S` has passed, then steps
the slots that have a frame. A slot whose audio is late is masked for that tick and stepped on a
later one, when its frame arrives: it never holds the others and is never fed invented input.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..engine.base import NOTHING_YET, Engine, Said

GATHER_S = 0.02  # a quarter of a frame: the most a tick waits for late slots before stepping without them


@dataclass(frozen=True)
class Tick:
    slots: int  # how many slots were stepped
    step_ms: float  # the engine's step, on the model's thread


class Ticker:
    def __init__(self, engine: Engine, pool: Any, on_tick: Callable[[Tick], None] = lambda tick: None,
                 gather_s: float = GATHER_S):
        self.engine, self.pool, self.on_tick, self.gather_s = engine, pool, on_tick, gather_s
        self.talking: set[int] = set()
        self.frames: dict[int, tuple[np.ndarray, asyncio.Future]] = {}
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def _on_model_thread(self, call: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, call, *args)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def open(self) -> int:
        slot = await self._on_model_thread(self.engine.open)
        self.talking.add(slot)
        return slot

    async def close(self, slot: int) -> None:
        self.talking.discard(slot)
        pending = self.frames.pop(slot, None)
        if pending is not None and not pending[1].done():
            pending[1].cancel()
        await self._on_model_thread(self.engine.close, slot)

    async def step(self, slot: int, pcm: np.ndarray) -> Said:
        """The slot's next frame, stepped at the next tick; what the model gave back for it."""
        future = asyncio.get_running_loop().create_future()
        self.frames[slot] = (pcm, future)
        self.arrived.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            if not self.frames:
                continue
            await self._gather()
            batch, self.frames = self.frames, {}
            try:
                said, tick = await self._on_model_thread(self._step, {slot: pcm for slot, (pcm, _) in batch.items()})
            except Exception as exc:  # noqa: BLE001 - each conversation hears of it; the ticker goes on
                for _, future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.on_tick(tick)
            for slot, (_, future) in batch.items():
                if not future.done():
                    future.set_result(said.get(slot, NOTHING_YET))

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather_s
        while not self.talking <= self.frames.keys() and loop.time() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
            self.arrived.clear()

    def _step(self, frames: dict[int, np.ndarray]) -> tuple[dict[int, Said], Tick]:
        began = time.perf_counter()
        for slot, pcm in frames.items():
            self.engine.feed(slot, pcm)
        said = self.engine.step()
        return said, Tick(len(frames), 1000 * (time.perf_counter() - began))
