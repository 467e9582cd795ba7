"""The code style checks run with the tests, so the README's test command covers them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail("ruff is not installed in this environment: pip install -e '.[test]'")
    done = subprocess.run([str(ruff), "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


class Mypy:
    """The type checker over src/, started once by pytest (conftest.py) before the tests, beside them at a lower
    priority: a first run in a fresh clone takes half a minute of one core, which the tests leave idle while a
    server child computes. It writes its output and then its exit code into a folder named by MYPY_DIR (read
    by every test worker); the test waits for the verdict, or runs mypy itself when nothing started it."""

    ENV = "JMOSHI_TEST_MYPY_DIR"
    process: subprocess.Popen | None = None

    @classmethod
    def start(cls) -> None:
        mypy = Path(sys.executable).with_name("mypy")
        if cls.ENV in os.environ or not mypy.exists():
            return
        folder = Path(tempfile.mkdtemp(prefix="jmoshi-test-mypy-"))
        script = '"$1" > "$2/output.txt" 2>&1; echo $? > "$2/code.tmp"; mv "$2/code.tmp" "$2/code"'
        cls.process = subprocess.Popen(["sh", "-c", script, "sh", str(mypy), str(folder)], cwd=ROOT,
                                       preexec_fn=lambda: os.nice(10), start_new_session=True)
        os.environ[cls.ENV] = str(folder)

    @classmethod
    def stop(cls) -> None:
        if cls.process is None:
            return
        if cls.process.poll() is None:
            os.killpg(cls.process.pid, signal.SIGKILL)
            cls.process.wait()
        shutil.rmtree(os.environ.pop(cls.ENV), ignore_errors=True)
        cls.process = None

    @classmethod
    def verdict(cls, timeout_s: float = 600) -> tuple[int, str]:
        folder = Path(os.environ[cls.ENV])
        deadline = time.monotonic() + timeout_s
        while not (folder / "code").exists():
            assert time.monotonic() < deadline, "mypy gave no verdict within 10 minutes"
            time.sleep(0.2)
        return int((folder / "code").read_text()), (folder / "output.txt").read_text()


def test_mypy_finds_nothing_in_src():
    """The type checker's settings are pyproject.toml's [tool.mypy]."""
    mypy = Path(sys.executable).with_name("mypy")
    if not mypy.exists():
        pytest.fail("mypy is not installed in this environment: pip install -e '.[test]'")
    if Mypy.ENV in os.environ:
        code, text = Mypy.verdict()
    else:
        done = subprocess.run([str(mypy)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        code, text = done.returncode, done.stdout + done.stderr
    assert code == 0 and "Success" in text, text[-5000:]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports when it runs: at the top or inside a
    function (both happen), not under `if TYPE_CHECKING:` (never run)."""
    import ast

    root = package.parent
    modules = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
               for f in package.rglob("*.py")}

    def targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        here = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""] if node.level else [node.module or ""])
        base = base.rstrip(".")
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]

    def runtime_nodes(tree: ast.AST):
        for node in ast.iter_child_nodes(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
                continue
            yield node
            yield from runtime_nodes(node)

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        nodes = runtime_nodes(ast.parse(path.read_text()))
        graph[module] = {t for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))
                         for t in targets(module, n) if t in modules and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_src():
    graph = import_graph(ROOT / "src" / "jmoshi_cli")
    assert len(graph) > 50 and graph["jmoshi_cli.cli"]  # the graph was read, not empty
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def private_reaches(source: str) -> list[str]:
    """`module._name` in test code where `module` was imported from jmoshi_cli: a private name reached
    from outside (dunders aside)."""
    import ast

    tree = ast.parse(source)
    modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("jmoshi_cli") for alias in node.names}
    modules |= {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names if alias.name.startswith("jmoshi_cli")}
    return [f"{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name) and node.value.id in modules]


def test_tests_reach_no_private_name_of_jmoshi():
    """Tests go through the public face; what they need is made public on purpose."""
    found = {path.name: reaches for path in sorted((ROOT / "tests").glob("*.py"))
             if (reaches := private_reaches(path.read_text()))}
    assert found == {}


def test_the_private_name_finder_finds_one():
    assert private_reaches("from jmoshi_cli import hub\nhub._resolve(1)\nhub.public()\nx._y\n") == ["2: hub._resolve"]
