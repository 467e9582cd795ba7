"""A program tied to jmoshi through the supervisor (macOS's way, chosen here on Linux): it dies with jmoshi,
hears the signals the supervisor is sent, and its exit status is the supervisor's.

Real processes and signals; every wait polls up to a deadline meant for a busy machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jmoshi_cli import scratch
from jmoshi_cli.selftest import free_port
from jmoshi_cli.serving import lifetime

from helpers import alive, children_of, listening, wait_until

DEADLINE_S = 30

# The program: writes its pid once its SIGTERM handling is set (exit 7, or the default death), then waits.
PROGRAM = """
import os, signal, sys, time
if sys.argv[2] == "exit-7":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""

# jmoshi, as far as the program is concerned: starts it tied to itself, says the supervisor's pid, waits.
PARENT = """
import subprocess, sys, time
from jmoshi_cli.serving.lifetime import tied_argv
supervisor = subprocess.Popen(tied_argv(sys.argv[1:], supervise=True))
print(supervisor.pid, flush=True)
time.sleep(600)
"""


# `jmoshi front` as macOS runs it: HAProxy under the supervisor, in a process that is then killed.
FRONT = """
import sys, time
from jmoshi_cli.selftest import free_port
from jmoshi_cli.serving import haproxy, lifetime
lifetime.has_pdeathsig = lambda: False
front = haproxy.Front("127.0.0.1", int(sys.argv[1]), [haproxy.Backend("r0", "127.0.0.1", free_port())], 5.0)
front.start()
print(front.process.pid, front.folder, flush=True)
time.sleep(600)
"""


def program(pid_file: Path, on_sigterm: str = "die") -> list[str]:
    return [sys.executable, "-c", PROGRAM, str(pid_file), on_sigterm]


def program_pid(pid_file: Path) -> int:
    wait_until(pid_file.exists, DEADLINE_S, "the program to start")
    return int(pid_file.read_text())


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def leftovers():
    """Pids to kill after the test if they still run: no orphan outlives a failed assertion."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_kill_9_of_the_parent_takes_the_supervised_program_down(tmp_path, leftovers):
    pid_file = tmp_path / "program.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *program(pid_file)], stdout=subprocess.PIPE, text=True)
    try:
        supervisor = int(parent.stdout.readline())
        child = program_pid(pid_file)
        leftovers.extend([supervisor, child])
        assert parent_of(child) == supervisor != child  # supervised: not exec'd in the supervisor's place
        parent.kill()
        parent.wait()
        wait_until(lambda: not alive(child) and not alive(supervisor), DEADLINE_S,
                   "the program and its supervisor to die with their parent")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_kill_9_of_jmoshi_front_takes_haproxy_down_where_the_kernel_cannot(haproxy_binary, leftovers):
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", FRONT, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        pid, folder = parent.stdout.readline().split(maxsplit=1)
        supervisor, folder = int(pid), Path(folder.strip())
        leftovers.append(supervisor)
        wait_until(lambda: children_of(supervisor), DEADLINE_S, "HAProxy to start under its supervisor")
        haproxy_pid = children_of(supervisor)[0]
        leftovers.append(haproxy_pid)
        assert listening(port)
        parent.kill()
        parent.wait()
        wait_until(lambda: not alive(haproxy_pid) and not listening(port), DEADLINE_S,
                   "HAProxy to die with jmoshi and free its port")
        scratch.sweep()  # the folder jmoshi could not remove: the next one does
        assert not folder.exists()
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


@pytest.mark.parametrize(("on_sigterm", "status"), [("exit-7", 7), ("die", -signal.SIGTERM)])
def test_sigterm_to_the_supervisor_reaches_the_program_whose_status_comes_back(tmp_path, leftovers, on_sigterm,
                                                                               status):
    pid_file = tmp_path / "program.pid"
    supervisor = subprocess.Popen(lifetime.tied_argv(program(pid_file, on_sigterm), supervise=True))
    leftovers.append(supervisor.pid)
    child = program_pid(pid_file)
    leftovers.append(child)
    os.kill(supervisor.pid, signal.SIGTERM)  # the supervisor alone, not its group: it must pass it on
    assert supervisor.wait(DEADLINE_S) == status
    wait_until(lambda: not alive(child), DEADLINE_S, "the program to exit")


def test_the_supervisor_exits_as_the_program_did():
    done = subprocess.run(lifetime.tied_argv([sys.executable, "-c", "raise SystemExit(3)"], supervise=True),
                          timeout=DEADLINE_S, check=False)
    assert done.returncode == 3


def test_a_supervisor_whose_parent_is_already_gone_starts_nothing(tmp_path):
    pid_file = tmp_path / "program.pid"
    argv = lifetime.tied_argv(program(pid_file), parent_pid=os.getppid(), supervise=True)  # not its parent
    assert subprocess.run(argv, timeout=DEADLINE_S, check=False).returncode == 1
    assert not pid_file.exists()


def test_where_the_kernel_signals_it_execs_and_elsewhere_the_supervisor_runs(monkeypatch):
    monkeypatch.setattr(lifetime, "has_pdeathsig", lambda: True)
    assert lifetime.SUPERVISE not in lifetime.tied_argv(["haproxy"])
    assert lifetime.SUPERVISE in lifetime.tied_argv(["haproxy"], supervise=True)
    monkeypatch.setattr(lifetime, "has_pdeathsig", lambda: False)
    assert lifetime.SUPERVISE in lifetime.tied_argv(["haproxy"])
    assert lifetime.SUPERVISE not in lifetime.tied_argv(["haproxy"], supervise=False)


# A child tied to this process whose console (a pipe) this process stops reading, as a dying jmoshi does for
# a moment before the kernel signals its children: a write then raises BrokenPipeError in whatever wrote.
BROKEN_CONSOLE = """
import os, sys
from jmoshi_cli.serving.lifetime import die_with_parent
die_with_parent(os.getppid())
print("ready", flush=True)
sys.stdin.readline()  # the parent has closed its end of our console
try:
    for _ in range(1000):
        print("a line of the server's log", flush=True)
except BrokenPipeError:
    os._exit(3)  # what the server's code would have seen
os._exit(4)
"""


def test_a_child_whose_console_breaks_takes_its_signal_at_once_rather_than_an_error():
    child = subprocess.Popen([sys.executable, "-c", BROKEN_CONSOLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        child.stdout.close()
        child.stdin.write(b"go\n")
        child.stdin.close()
        assert child.wait(DEADLINE_S) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
