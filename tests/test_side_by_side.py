"""side_by_side.run_all: calls on threads, results in order, the first error stops the others."""

from __future__ import annotations

import threading
import time

import pytest

from jmoshi_cli.cache.side_by_side import run_all


def test_results_come_in_the_calls_order_whatever_order_they_finish_in():
    def after(seconds: float, value: str):
        return lambda: time.sleep(seconds) or value

    calls = [after(0.2, "a"), after(0.0, "b"), after(0.1, "c")]
    assert run_all(calls, 3, threading.Event()) == ["a", "b", "c"]


def test_no_more_than_at_once_run_together_started_in_the_given_order():
    lock, running, most, started = threading.Lock(), [0], [0], []

    def call(index: int):
        def run():
            with lock:
                started.append(index)
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return index
        return run

    assert run_all([call(i) for i in range(5)], 2, threading.Event(), order=[4, 3, 2, 1, 0]) == [0, 1, 2, 3, 4]
    assert most[0] == 2
    assert started[:2] == [4, 3] or started[:2] == [3, 4]


def test_the_first_error_stops_the_others_and_is_raised_once_they_ended():
    stop, ended = threading.Event(), []

    def fails():
        time.sleep(0.05)
        raise ValueError("bad file")

    def watches_stop():
        while not stop.wait(0.01):
            pass
        time.sleep(0.1)  # cleaning up after itself
        ended.append(True)
        raise RuntimeError("stopped")

    with pytest.raises(ValueError, match="bad file"):
        run_all([watches_stop, fails], 2, stop)
    assert ended == [True]  # it was waited for: nothing of it still runs


def test_a_call_that_ignores_stop_is_left_behind_after_the_grace_time():
    release = threading.Event()

    def fails():
        raise ValueError("bad file")

    started = time.monotonic()
    with pytest.raises(ValueError):
        run_all([lambda: release.wait(30), fails], 2, threading.Event(), grace_s=0.2)
    assert time.monotonic() - started < 5
    release.set()


def test_one_call_runs_on_the_callers_thread():
    assert run_all([threading.current_thread], 4, threading.Event()) == [threading.current_thread()]


def test_a_ctrl_c_while_waiting_is_raised_at_once():
    stop, release = threading.Event(), threading.Event()

    def interrupt():
        time.sleep(0.05)
        raise KeyboardInterrupt  # as the main thread would get it while waiting

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_all([lambda: release.wait(30), interrupt], 2, stop, grace_s=20)
    assert time.monotonic() - started < 5 and stop.is_set()
    release.set()


def test_one_at_a_time_still_starts_them_in_the_given_order():
    started: list[int] = []
    calls = [lambda i=i: started.append(i) or i for i in range(3)]
    assert run_all(calls, 1, threading.Event(), order=[2, 0, 1]) == [0, 1, 2]
    assert started == [2, 0, 1]
