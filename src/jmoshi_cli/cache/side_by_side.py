"""Run a few calls at once on daemon threads: results in the calls' order, the first error ends them all.

Not concurrent.futures: the interpreter joins its worker threads when it exits, so a Ctrl-C during
a 15 GB download would wait for that download to end. Here the first error sets `stop`, which the
calls are expected to watch, waits up to `grace_s` for them to wind down (clean up their partial
files), then raises; a Ctrl-C sets it and raises at once. A call still running after that is a
daemon thread: it ends with the process, and what it leaves is a partial file the next run resumes.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


WAKE_S = 0.2  # how often the waiting main thread looks at signals (see _next)


def run_all(calls: Sequence[Callable[[], T]], at_once: int, stop: threading.Event,
            order: Sequence[int] | None = None, grace_s: float = 10.0) -> list[T]:
    """Each call's result, in the order of `calls`; at most `at_once` run together.

    `order` is the order to start them in (indexes into `calls`; default: as given).
    """
    waiting = list(order if order is not None else range(len(calls)))
    results: dict[int, T] = {}
    if at_once <= 1 or len(calls) <= 1:  # nothing to overlap: no thread, in the same order
        results = {i: calls[i]() for i in waiting}
        return [results[i] for i in range(len(calls))]
    finished: queue.Queue = queue.Queue()
    running = 0
    try:
        while waiting or running:
            while waiting and running < at_once:
                _start(calls, waiting.pop(0), finished)
                running += 1
            index, error, result = _next(finished)
            running -= 1
            if error is not None:
                raise error
            results[index] = result
    except KeyboardInterrupt:
        stop.set()  # a person is waiting: no grace, the calls end with the process
        raise
    except BaseException:
        stop.set()
        _wind_down(finished, running, grace_s)
        raise
    return [results[i] for i in range(len(calls))]


def _next(finished: queue.Queue) -> tuple:
    """The next call that ended. Waits in short slices: the kernel may hand Ctrl-C's signal to a download
    thread, and Python raises KeyboardInterrupt only when the main thread runs again, which a wait with no
    end would put off until a whole download had finished."""
    while True:
        try:
            return finished.get(timeout=WAKE_S)
        except queue.Empty:
            continue


def _start(calls: Sequence[Callable[[], T]], index: int, finished: queue.Queue) -> None:
    def work() -> None:
        try:
            finished.put((index, None, calls[index]()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            finished.put((index, exc, None))

    threading.Thread(target=work, name=f"call {index}", daemon=True).start()


def _wind_down(finished: queue.Queue, running: int, grace_s: float) -> None:
    """Wait until the calls still running have ended, or `grace_s` has passed."""
    deadline = time.monotonic() + grace_s
    while running:
        try:
            finished.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            return
        running -= 1
