"""Shared fixtures: a loopback hub with J-Moshi-shaped repos, and a fresh cache per test."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from hub_server import LocalHub

# The suite runs on a worker per core and one more (pyproject.toml: pytest-xdist), each test's torch on one
# thread, as jmoshi gives each server child on the CPU (backends.cpu_threads): OpenMP's threads wait for their
# slowest, so multi-threaded torch processes on busy cores stall each other at every parallel region. Set before
# anything imports torch; every child inherits it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# moshi on the CPU runs uncompiled, as jmoshi runs it there (runtime.compile_env: NO_TORCH_COMPILE=1 in each child
# and in `jmoshi infer`): a test that steps moshi in its own process would otherwise compile RMSNorm with inductor
# (seconds per worker and per shape). moshi reads it when imported; tests of the policy pass their own environment.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
# The suite starts about 150 Python processes over the same sources: each compiles them once, not each time.
# Where PYTHONDONTWRITEBYTECODE is set (container images often set it), every child compiled jmoshi_cli's
# modules again, and every worker rewrote the assertions of every test module again (pytest caches them
# only where bytecode may be written). The caches go to __pycache__ folders, which git ignores.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"
# Every server a test starts checks this token (JMOSHI_TOKEN), and the tests' clients send it.
TEST_TOKEN = "jmoshi-test-token-0123456789"
MIB = 1024 * 1024


def _random_file(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(str(seed).encode()).digest() * (MIB // 32)
    with path.open("wb") as out:
        left = size
        while left:
            out.write(block[: min(left, len(block))])
            left -= min(left, len(block))
            block = hashlib.sha256(block[:64]).digest() * (MIB // 32)


def _web_ui(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("dist/index.html", "<html><title>test UI</title></html>"),
                           ("dist/assets/app.js", "console.log('ui')")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory) -> Path:
    """J-Moshi-shaped repos with made-up content: 25 MiB weights so resuming crosses 10 MiB chunks."""
    root = tmp_path_factory.mktemp("hub")
    for repo, seed in (("nu-dialogue/j-moshi-ext", 1), ("nu-dialogue/j-moshi", 2)):
        _random_file(root / repo / "model.safetensors", 25 * MIB + 123, seed)
        _random_file(root / repo / "tokenizer_spm_32k_3.model", 300_000, seed + 10)
        _random_file(root / repo / "tokenizer-e351c8d8-checkpoint125.safetensors", 3 * MIB, seed + 20)
        (root / repo / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    _web_ui(root / "kyutai" / "moshi-artifacts" / "dist.tgz")
    custom = root / "lab" / "custom-moshi"
    _random_file(custom / "lm.safetensors", 2 * MIB, 7)
    _random_file(custom / "tok.model", 10_000, 8)
    _random_file(custom / "mimi.safetensors", MIB, 9)
    (custom / "config.json").write_text('{"dim": 64}')
    return root


@pytest.fixture
def hub(hub_root):
    with LocalHub(hub_root) as server:
        yield server


@pytest.fixture
def env(tmp_path, hub) -> dict:
    """Environment for a jmoshi child process: loopback hub, empty cache, fast retries."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "JMOSHI_"))}
    out.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / "cache"), JMOSHI_HOME=str(tmp_path / "home"),
               HF_HUB_DISABLE_TELEMETRY="1", JMOSHI_RETRY_BASE_S="0.05", NO_COLOR="1",
               XDG_CONFIG_HOME=str(tmp_path / "config"), JMOSHI_TOKEN=TEST_TOKEN)
    return out


def jmoshi(*args: str, env: dict, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process: for what only a process shows (its exit on a signal, the children
    it leaves or not, a model loaded into a fresh interpreter); otherwise :func:`cli` is as real and faster."""
    return subprocess.run([sys.executable, "-m", "jmoshi_cli", *args], env=child_env(env), capture_output=True,
                          text=True, timeout=timeout, **kw)


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    """Run the real CLI in this process, as `jmoshi ARGS` runs in a shell with `env`: the same entry point
    (the one place errors become exit codes), its stdout and stderr captured, the environment swapped in for
    the call. jmoshi reads its settings (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE...) from the environment
    at each call and hands them to huggingface_hub, so nothing read at import stands in the way."""
    import contextlib
    from unittest import mock

    from jmoshi_cli import cli as entry
    from jmoshi_cli import console as ui

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, child_env(env), clear=True), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = entry.run(list(args))
        finally:
            ui.settings.verbose = False
    return subprocess.CompletedProcess(["jmoshi", *args], code, out.getvalue(), err.getvalue())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


TINY_VARIANTS = ('[variants.tiny]\nrepo = "jmoshi-test/tiny"\ndescription = "tiny random Moshi for tests"\n'
                 'vram_gb = 0\nvram_min_gb = 0\nlicense = "test"\n')


@pytest.fixture(scope="session")
def tiny_hub_root(tmp_path_factory) -> Path:
    """A hub holding the tiny generated model (with config.json) and a small web UI bundle."""
    from jmoshi_cli.tiny_model import TINY_FILES, build_web_ui_bundle, cached_tiny_repo

    repo = cached_tiny_repo()
    root = tmp_path_factory.mktemp("tiny-hub")
    (root / "jmoshi-test" / "tiny").mkdir(parents=True)
    for name in TINY_FILES:
        (root / "jmoshi-test" / "tiny" / name).symlink_to(repo / name)
    build_web_ui_bundle(root / "kyutai" / "moshi-artifacts" / "dist.tgz")
    return root


def tiny_variant_env(folder: Path, endpoint: str) -> dict:
    """This environment without the hub's or jmoshi's settings, then the tiny variant (variants.toml, written
    into `folder`) on the hub at `endpoint`, with its cache and jmoshi's home in `folder`."""
    (folder / "variants.toml").write_text(TINY_VARIANTS)
    out = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "JMOSHI_"))}
    out.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(folder / "cache"), JMOSHI_HOME=str(folder / "home"),
               JMOSHI_VARIANTS=str(folder / "variants.toml"), HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1")
    return out


@pytest.fixture
def tiny_env(tmp_path, tiny_hub_root):
    """Environment for jmoshi with the tiny variant on a loopback hub and an empty cache."""
    with LocalHub(tiny_hub_root) as server:
        out = tiny_variant_env(tmp_path, server.endpoint)
        out.update(JMOSHI_RETRY_BASE_S="0.05", JMOSHI_TOKEN=TEST_TOKEN)
        out["hub"] = server  # removed before use; lets tests reach the server
        yield out


@pytest.fixture(scope="session")
def tiny_download(tmp_path_factory, tiny_hub_root) -> Path:
    """The tiny variant downloaded once per worker by `jmoshi download`: the cache `tiny_downloaded` links from."""
    folder = tmp_path_factory.mktemp("tiny-download")
    with LocalHub(tiny_hub_root) as server:
        done = run_cli("download", "--variant", "tiny", env=tiny_variant_env(folder, server.endpoint))
    assert done.returncode == 0, done.stderr
    return folder / "cache"


@pytest.fixture
def tiny_downloaded(tiny_env, tiny_download) -> None:
    """tiny_env's cache already holding the tiny variant, for a test of what comes after the download (serving,
    recording, killing...): hard links to the worker's one download, the hub's symlinks kept, so the test
    saves a 200 MB download and its hashing. The files are never written in place (a hub file is replaced
    whole), so no test changes another's."""
    shutil.copytree(tiny_download, tiny_env["HF_HUB_CACHE"], symlinks=True, copy_function=os.link)


def child_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if isinstance(v, str)}


@pytest.fixture(scope="session")
def haproxy_binary() -> str:
    """HAProxy is a system package: .ci/run installs it; elsewhere its absence skips the tests that need it."""
    from jmoshi_cli.errors import PreflightError
    from jmoshi_cli.serving import haproxy

    try:
        return haproxy.find().path
    except PreflightError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install HAProxy: {exc.message}")
        pytest.skip(exc.message)


def pytest_configure(config) -> None:
    """The type check starts beside the suite, once (in xdist's controller, not in each worker), when the run
    includes it; tests/test_style.py collects the verdict."""
    if hasattr(config, "workerinput"):
        return
    tests = Path(__file__).parent
    if not config.args or any("test_style" in arg or Path(arg).resolve() == tests for arg in config.args):
        from test_style import Mypy

        Mypy.start()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject.toml) starts one worker more than there are cores. Part of the suite waits on real time
    (audio paced at 80 ms a frame, HAProxy's queue timeout, idle timeouts, retry back-offs, a browser), and two
    such waits at once left one core of two idle: 67 core-seconds of a 308 s run on 2 cores. A third worker
    fills them (the same tree: 292 s, 7 idle core-seconds)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores + 1


# Each test's seconds in a recorded run of the whole suite (setup, call and teardown).
TEST_SECONDS = Path(__file__).with_name("test_seconds.json")


def pytest_addoption(parser) -> None:
    parser.addoption("--record-test-seconds", action="store_true", default=False,
                     help=f"write each test's seconds in this run to tests/{TEST_SECONDS.name}, by which the "
                          "workers take the heaviest files first")


def _file(item) -> str:
    return item.nodeid.partition("::")[0]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: the weight of what runs
def pytest_collection_modifyitems(config, items) -> None:
    """The heaviest files first, by the recorded seconds of their selected tests (a test not recorded yet counts
    as light). Whole files go to the workers in this order (pyproject.toml: --dist loadfile
    --no-loadscope-reorder): a 30-second file of one test taken last would keep one worker busy while the other
    waits. The sort is stable, so each file's tests stay together and in their order, the same on every worker."""
    seconds = json.loads(TEST_SECONDS.read_text()) if TEST_SECONDS.exists() else {}
    weight: collections.Counter = collections.Counter()
    for item in items:
        weight[_file(item)] += seconds.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -weight[_file(item)])


_spent: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report) -> None:
    _spent[report.nodeid] += report.duration


def pytest_sessionfinish(session) -> None:
    if session.config.getoption("record_test_seconds") and not hasattr(session.config, "workerinput"):
        recorded = {nodeid: round(seconds, 2) for nodeid, seconds in sorted(_spent.items())}
        TEST_SECONDS.write_text(json.dumps(recorded, indent=0) + "\n")


def pytest_unconfigure(config) -> None:
    if not hasattr(config, "workerinput"):
        from test_style import Mypy

        Mypy.stop()


CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).exists() and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (.ci/run)")
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(180)
    try:
        yield driver
    finally:
        driver.quit()
