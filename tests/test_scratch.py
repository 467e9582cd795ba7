"""Private temp folders that a killed jmoshi leaves are removed by the next one; whether a process still runs.

Real processes killed with SIGKILL; the folders live in the test's own folder, except where the system's
temp folder itself is what is tested.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jmoshi_cli import scratch
from jmoshi_cli.recording import format as recordings

MAKER = ("import sys, time; from pathlib import Path; from jmoshi_cli import scratch; "
         "print(scratch.make(sys.argv[1], Path(sys.argv[2])), flush=True); time.sleep(600)")


class Maker:
    """Another jmoshi process that made its folder and keeps running until killed."""

    def __init__(self, root: Path, kind: str = "front"):
        self.process = subprocess.Popen([sys.executable, "-c", MAKER, kind, str(root)], stdout=subprocess.PIPE,
                                        text=True)
        self.folder = Path(self.process.stdout.readline().strip())  # blocks until it is made, or it failed

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def makers():
    started: list[Maker] = []

    def start(root: Path) -> Maker:
        started.append(Maker(root))
        return started[-1]

    yield start
    for maker in started:
        maker.kill()


def marked(root: Path, name: str, pid: int, start: str | None, place: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(mode=0o700)
    place = scratch.this_place() if place is None else place
    (folder / scratch.MARKER).write_text(json.dumps({"pid": pid, "start": start, "place": place}))
    return folder


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_folder_of_a_killed_jmoshi_goes_when_the_next_one_makes_its_own(tmp_path, makers):
    killed, living = makers(tmp_path), makers(tmp_path)
    assert killed.folder.is_dir() and killed.folder.name.startswith("jmoshi-front-")
    assert stat.S_IMODE(killed.folder.stat().st_mode) == 0o700
    assert scratch.owner(killed.folder) == scratch.Owner(killed.process.pid, scratch.process_start(killed.process.pid),
                                                         scratch.this_place())
    (killed.folder / "haproxy.cfg").write_text("global\n")
    killed.kill()

    mine = scratch.make("selftest", tmp_path)
    assert not killed.folder.exists()
    assert living.folder.is_dir()  # its owner runs
    assert mine.is_dir() and scratch.owner(mine) == scratch.Owner.this_process()


def test_only_marked_folders_of_ended_owners_are_removed(tmp_path):
    this = scratch.Owner.this_process()
    unmarked = tmp_path / "jmoshi-front-unmarked"
    unmarked.mkdir()
    (unmarked / "haproxy.cfg").write_text("global\n")
    garbled = tmp_path / "jmoshi-front-garbled"
    garbled.mkdir()
    (garbled / scratch.MARKER).write_text('{"pid": ')  # read while its owner was writing it
    other_name = marked(tmp_path, "other-front-x", dead_pid(), None)
    a_file = tmp_path / "jmoshi-front-file"
    a_file.write_text("not a folder")
    ended = marked(tmp_path, "jmoshi-front-ended", dead_pid(), None)
    reused = marked(tmp_path, "jmoshi-front-reused", this.pid, "ticks:1")  # this pid, once another process's
    ours = marked(tmp_path, "jmoshi-front-ours", this.pid, this.start)
    other_clock = marked(tmp_path, "jmoshi-front-ps", this.pid, "lstart:Thu Jan  1 00:00:00 1970")
    elsewhere = marked(tmp_path, "jmoshi-front-container", dead_pid(), None, "another-host pid:[4026531836]")

    assert sorted(scratch.sweep(tmp_path)) == sorted([ended, reused])
    assert not ended.exists() and not reused.exists()
    for kept in (unmarked, garbled, other_name, a_file, ours, other_clock, elsewhere):
        assert kept.exists(), kept


def test_an_unmarked_folder_with_a_jmoshi_name_in_the_system_temp_folder_is_kept():
    unrelated = Path(tempfile.mkdtemp(prefix="jmoshi-front-"))
    try:
        with scratch.held("selftest") as folder:
            assert folder.parent == Path(tempfile.gettempdir()) and unrelated.is_dir()
        assert unrelated.is_dir() and not folder.exists()
    finally:
        shutil.rmtree(unrelated)


def test_held_removes_its_folder_when_the_block_ends(tmp_path):
    with scratch.held("selftest", tmp_path) as folder:
        (folder / "dist.tgz").write_bytes(b"x")
    assert not folder.exists()


# --- without /proc (macOS): ps says when a process started --------------------------------------------


@pytest.fixture
def no_proc(tmp_path, monkeypatch):
    monkeypatch.setattr(scratch, "PROC", tmp_path / "no-proc")


def test_without_proc_the_start_comes_from_ps_and_tells_a_reused_pid(no_proc):
    start = scratch.process_start(os.getpid())
    assert start is not None and start.startswith("lstart:") and start == scratch.process_start(os.getpid())
    assert scratch.is_running(os.getpid(), start)
    assert not scratch.is_running(os.getpid(), "lstart:Thu Jan  1 00:00:00 1970")
    assert scratch.process_start(dead_pid()) is None
    assert not scratch.is_running(dead_pid())


def test_without_proc_a_killed_jmoshi_folder_is_still_removed(tmp_path, makers, no_proc):
    killed, living = makers(tmp_path), makers(tmp_path)
    killed.kill()
    scratch.make("front", tmp_path)
    assert not killed.folder.exists() and living.folder.is_dir()


def test_without_proc_a_recording_of_a_killed_server_is_settled(no_proc, monkeypatch):
    """What a server on macOS wrote in meta.json: no boot id and no start ticks, only its pid."""
    monkeypatch.setattr(recordings, "_boot_id", lambda: "")
    here = dict(recordings.server_identity(), boot_id="", start_ticks=None)
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert not recordings.server_gone(dict(here, pid=server.pid))
    finally:
        server.kill()
        server.wait()
    assert recordings.server_gone(dict(here, pid=server.pid))
    assert not recordings.server_gone(dict(here, pid=os.getpid()))


def test_with_proc_a_reused_pid_is_not_the_server_that_recorded():
    here = recordings.server_identity()
    assert not recordings.server_gone(here)
    assert recordings.server_gone(dict(here, start_ticks=here["start_ticks"] - 1))
    assert recordings.server_gone(dict(here, pid=dead_pid()))
