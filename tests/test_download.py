"""`jmoshi download` and `jmoshi verify` against the loopback hub, with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli, sha256

FILES = ("model.safetensors", "tokenizer_spm_32k_3.model", "tokenizer-e351c8d8-checkpoint125.safetensors")
EXT = "nu-dialogue/j-moshi-ext"


def resolve_gets(hub) -> list[tuple[str, str, dict]]:
    return [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]


def assert_one_line_error(result, *needles: str) -> None:
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_download_fetches_every_file_verified_and_prints_paths(env, hub, hub_root):
    result = run_cli("download", "--variant", "ext", env=env)
    assert result.returncode == 0, result.stderr
    paths = [Path(p) for p in result.stdout.split()]
    by_name = {p.name: p for p in paths}
    for name in FILES:
        assert sha256(by_name[name]) == sha256(hub_root / EXT / name)
    assert sha256(by_name["dist.tgz"]) == sha256(hub_root / "kyutai/moshi-artifacts/dist.tgz")
    # Standard cache layout, so moshi and huggingface_hub find the files themselves.
    cache = Path(env["HF_HUB_CACHE"])
    commit = (cache / "models--nu-dialogue--j-moshi-ext" / "refs" / "main").read_text()
    assert commit == hub.commit_sha(EXT)
    assert by_name["model.safetensors"].parent.name == commit
    assert (by_name["dist.tgz"].parent / "dist" / "index.html").is_file()
    assert "sha256 verified" in result.stderr


def test_second_download_fetches_nothing(env, hub):
    assert run_cli("download", env=env).returncode == 0
    hub.clear_log()
    again = run_cli("download", env=env)
    assert again.returncode == 0, again.stderr
    assert resolve_gets(hub) == []
    assert "already cached" in again.stderr


def test_cached_files_resolve_offline_with_huggingface_hub_itself(env, hub):
    assert run_cli("download", env=env).returncode == 0
    offline = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    script = (f"from huggingface_hub import hf_hub_download as d; print(d('{EXT}', 'model.safetensors'));"
              "print(d('kyutai/moshi-artifacts', 'dist.tgz'))")
    done = subprocess.run([sys.executable, "-c", script], env=offline, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(Path(p).is_file() for p in done.stdout.split())


def test_dry_run_lists_missing_bytes_and_downloads_nothing(env, hub, hub_root):
    result = run_cli("download", "--dry-run", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["variants"][0]
    expected = sum((hub_root / EXT / n).stat().st_size for n in FILES)
    expected += (hub_root / "kyutai/moshi-artifacts/dist.tgz").stat().st_size
    assert report["missing_bytes"] == expected
    assert {f["status"] for f in report["files"]} == {"missing"}
    assert resolve_gets(hub) == []


def test_cut_connection_is_resumed_within_the_same_run(env, hub, hub_root):
    hub.add_fault(EXT, "model.safetensors", "cut")
    result = run_cli("download", env=env)
    assert result.returncode == 0, result.stderr
    assert "retrying model.safetensors" in result.stderr
    ranged = [r for r in resolve_gets(hub) if r[1].endswith("model.safetensors") and "Range" in r[2]]
    assert ranged and ranged[-1][2]["Range"].startswith("bytes=10485760-")
    path = Path(json.loads(run_cli("download", "--json", env=env).stdout)["variants"][0]["files"][0]["path"])
    assert sha256(path) == sha256(hub_root / EXT / "model.safetensors")


def test_server_errors_are_retried_with_backoff(env, hub):
    hub.add_fault(EXT, "tokenizer_spm_32k_3.model", "500", times=2)
    result = run_cli("download", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("retrying tokenizer_spm_32k_3.model") == 2


def test_persistent_server_error_fails_cleanly_and_leaves_nothing_complete(env, hub):
    hub.add_fault(EXT, "model.safetensors", "500", times=50)
    result = run_cli("download", env=env)
    assert result.returncode == 3
    assert_one_line_error(result, "HTTP 500", "model.safetensors")
    assert not list(Path(env["HF_HUB_CACHE"]).glob("models--nu-dialogue--j-moshi-ext/snapshots/*/model.safetensors"))
    hub.clear_faults()
    assert run_cli("download", env=env).returncode == 0


def test_corrupt_body_is_detected_removed_and_fetched_again(env, hub, hub_root):
    hub.add_fault(EXT, "tokenizer-e351c8d8-checkpoint125.safetensors", "corrupt")
    result = run_cli("download", "--json", env=env)
    assert result.returncode == 0, result.stderr
    mimi = next(f for f in json.loads(result.stdout)["variants"][0]["files"] if f["role"] == "mimi")
    assert sha256(mimi["path"]) == sha256(hub_root / EXT / "tokenizer-e351c8d8-checkpoint125.safetensors")


def test_always_corrupt_file_fails_and_is_not_left_in_the_cache(env, hub):
    hub.add_fault(EXT, "tokenizer-e351c8d8-checkpoint125.safetensors", "corrupt", times=10)
    result = run_cli("download", env=env)
    assert result.returncode == 4
    assert_one_line_error(result, "corrupt", "removed")
    cache = Path(env["HF_HUB_CACHE"]) / "models--nu-dialogue--j-moshi-ext"
    assert not list(cache.glob("snapshots/*/tokenizer-e351c8d8-checkpoint125.safetensors"))
    verify = run_cli("verify", env=env)
    assert verify.returncode == 1 and "missing" in verify.stderr


def test_verify_reports_corruption_and_download_repairs_it(env, hub, hub_root):
    assert run_cli("download", env=env).returncode == 0
    assert run_cli("verify", env=env).returncode == 0
    blob = next(Path(env["HF_HUB_CACHE"]).glob("models--nu-dialogue--j-moshi-ext/snapshots/*/model.safetensors"))
    real = Path(os.path.realpath(blob))
    with real.open("r+b") as stream:
        stream.seek(1000)
        stream.write(b"\xff" * 16)
    result = run_cli("verify", "--json", env=env)
    assert result.returncode == 1
    statuses = {f["file"]: f["status"] for f in json.loads(result.stdout)["variants"][0]["files"]}
    assert statuses["model.safetensors"] == "corrupt"
    assert statuses["tokenizer_spm_32k_3.model"] == "complete"
    repaired = run_cli("download", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert sha256(blob) == sha256(hub_root / EXT / "model.safetensors")


def test_interrupted_download_exits_130_and_the_next_run_resumes(env, hub, hub_root):
    hub.add_fault(EXT, "model.safetensors", "slow")
    # 11 MiB at once, then nothing for ten minutes: huggingface_hub writes its first 10 MiB block and waits
    # for the rest, so the download is still going when the wait below sees that block, however busy the
    # machine (the hub's pause ends when the hub stops).
    hub.slow_chunk, hub.slow_delay = 11 * 2**20, 600.0
    # As from a terminal: a test run in the background of a shell inherits SIGINT ignored, and so would jmoshi.
    child = subprocess.Popen([sys.executable, "-m", "jmoshi_cli", "download"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    cache = Path(env["HF_HUB_CACHE"]) / "models--nu-dialogue--j-moshi-ext" / "blobs"
    weights = hub_root / EXT / "model.safetensors"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(p.stat().st_size > 0 for p in cache.glob("*.incomplete")
                                                   if p.stat().st_size < weights.stat().st_size):
        time.sleep(0.1)
    assert any(cache.glob("*.incomplete")), "the weights never started downloading"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)  # Ctrl-C ends it at once; a busy machine may take a while to say so
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert not list(cache.parent.glob("snapshots/*/model.safetensors"))
    hub.clear_faults()
    assert run_cli("download", env=env).returncode == 0
    assert run_cli("verify", env=env).returncode == 0


def test_the_cache_symlink_check_runs_before_the_downloads_start(env, hub, monkeypatch):
    """huggingface_hub tests once per repo folder whether it holds symlinks, in a temporary folder inside
    it. Run by a download thread, a Ctrl-C could end the process while that folder is made: the exit
    removes it under the thread, prints a traceback and leaves a folder in the cache."""
    import threading

    from huggingface_hub import file_download

    from jmoshi_cli.cache import artifacts
    from jmoshi_cli.variants import load_catalogue

    for key in ("HF_ENDPOINT", "HF_HUB_CACHE", "JMOSHI_HOME", "JMOSHI_RETRY_BASE_S", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, env[key])
    known: dict[str, bool] = {}
    monkeypatch.setattr(file_download, "_are_symlinks_supported_in_dir", known)
    tested: list[tuple[str, bool]] = []  # (folder, on the main thread) of each test actually run
    check = file_download.are_symlinks_supported

    def watched(folder=None):
        if str(Path(folder).resolve()) not in known:
            tested.append((Path(folder).name, threading.current_thread() is threading.main_thread()))
        return check(folder)

    monkeypatch.setattr(file_download, "are_symlinks_supported", watched)
    catalogue = load_catalogue()
    artifacts.download(artifacts.resolve(catalogue, catalogue.get("ext")))
    assert {name for name, _ in tested} >= {"models--nu-dialogue--j-moshi-ext", "models--kyutai--moshi-artifacts"}
    assert all(on_main for _, on_main in tested), tested
    assert not [p for p in Path(env["HF_HUB_CACHE"]).glob("models--*/tmp*")]


def test_all_downloads_every_variant(env, hub):
    result = run_cli("download", "--variant", "all", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert [r["repo"] for r in json.loads(result.stdout)["variants"]] == ["nu-dialogue/j-moshi", EXT]


def test_user_variant_with_config_json(env, hub, hub_root, tmp_path):
    variants = tmp_path / "variants.toml"
    variants.write_text('[variants.lab]\nrepo = "lab/custom-moshi"\nmoshi = "lm.safetensors"\n'
                        'tokenizer = "tok.model"\nmimi = "mimi.safetensors"\nvram_gb = 8\n')
    env["JMOSHI_VARIANTS"] = str(variants)
    result = run_cli("download", "--variant", "lab", "--no-web-ui", "--json", env=env)
    assert result.returncode == 0, result.stderr
    roles = {f["role"]: f for f in json.loads(result.stdout)["variants"][0]["files"]}
    assert set(roles) == {"moshi", "tokenizer", "mimi", "config"}
    assert Path(roles["config"]["path"]).read_text() == '{"dim": 64}'
    listed = run_cli("variants", "--json", env=env)
    assert "lab" in [v["name"] for v in json.loads(listed.stdout)["variants"]]


def test_variants_fit_80_columns_and_the_license_is_shown_before_downloading(env):
    listed = run_cli("variants", env={**env, "COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    lines = listed.stderr.splitlines()
    assert all(len(line) <= 100 for line in lines), lines
    ext = lines.index(next(line for line in lines if line.startswith("ext (default)")))
    assert "nu-dialogue/j-moshi-ext" in lines[ext] and "creativecommons.org/licenses/by-nc/4.0" in lines[ext + 2]
    fetched = run_cli("download", "--variant", "ext", "--no-web-ui", env=env)
    assert fetched.returncode == 0, fetched.stderr
    said = fetched.stderr
    assert said.index("nu-dialogue/j-moshi-ext is licensed CC BY-NC 4.0") < said.index("done nu-dialogue/j-moshi-ext")
    again = run_cli("download", "--variant", "ext", "--no-web-ui", env=env)
    assert "is licensed" not in again.stderr  # nothing to download, nothing to agree to again


# --- bad input: one line, the right exit code, nothing lost -----------------------------------------


def test_unknown_variant_lists_choices(env):
    result = run_cli("download", "--variant", "exd", env=env)
    assert result.returncode == 2
    assert_one_line_error(result, "unknown variant 'exd'", "did you mean 'ext'", "base, ext")


def test_unknown_revision(env, hub):
    result = run_cli("download", "--revision", "v9-nope", env=env)
    assert result.returncode == 2
    assert_one_line_error(result, "revision not found")


def test_malformed_revision(env):
    result = run_cli("download", "--revision", "../../etc", env=env)
    assert result.returncode == 2
    assert_one_line_error(result, "bad revision")


def test_unwritable_cache(env, hub, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env["HF_HUB_CACHE"] = str(blocker / "cache")
    result = run_cli("download", env=env)
    assert result.returncode == 4
    assert_one_line_error(result, "cannot write to the cache", "HF_HUB_CACHE")


def test_hub_unreachable_and_nothing_cached(env):
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    result = run_cli("download", env=env)
    assert result.returncode == 3
    assert_one_line_error(result, "cannot be reached", "127.0.0.1:9")


def test_offline_with_files_missing(env):
    env["HF_HUB_OFFLINE"] = "1"
    result = run_cli("download", env=env)
    assert result.returncode == 4
    assert_one_line_error(result, "offline", "jmoshi download")


def test_offline_with_everything_cached_succeeds(env, hub):
    assert run_cli("download", env=env).returncode == 0
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    result = run_cli("download", env=env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 4


def download_statuses(result) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    [variant] = json.loads(result.stdout)["variants"]
    assert variant["missing_bytes"] == 0
    return {f["file"]: f["status"] for f in variant["files"]}


def test_a_cached_file_with_no_known_hash_stays_unverified_and_is_used(env, hub):
    assert run_cli("download", "--variant", "ext", env=env).returncode == 0
    # A plain file in the snapshot, not a link to a blob named by its hash (a copied cache): offline, nothing
    # says what it should hash to.
    link = next(Path(env["HF_HUB_CACHE"]).glob("models--nu-dialogue--j-moshi-ext/snapshots/*/" + FILES[1]))
    content = link.read_bytes()
    link.unlink()
    link.write_bytes(content)
    env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    statuses = download_statuses(run_cli("download", "--variant", "ext", "--json", env=env))
    assert statuses[FILES[1]] == "unverified" and statuses[FILES[0]] == "complete"
    served = run_cli("download", "--variant", "ext", env=env)
    assert served.returncode == 0 and str(link) in served.stdout.split()  # usable: its path is handed on


def test_a_fetched_file_with_no_known_hash_is_unverified_and_shown_done(env, hub, monkeypatch):
    from jmoshi_cli.cache import artifacts

    known = artifacts.expected_hash
    monkeypatch.setattr(artifacts, "expected_hash",
                        lambda entry: None if entry.artifact.filename == FILES[1] else known(entry))
    result = run_cli("download", "--variant", "ext", "--json", env=env)
    statuses = download_statuses(result)
    assert statuses[FILES[1]] == "unverified" and statuses[FILES[0]] == "complete"
    assert re.search(rf"^done \S+/{re.escape(FILES[1])}: .*no content hash known to verify it$", result.stderr,
                     re.M), result.stderr


def test_gated_repo_needs_a_token(env, hub):
    hub.set_gated(EXT, "hf_granted")
    result = run_cli("download", env=env)
    assert result.returncode == 3
    assert_one_line_error(result, "gated", "HF_TOKEN")
    env["HF_TOKEN"] = "hf_granted"
    assert run_cli("download", env=env).returncode == 0


def test_not_enough_disk_is_refused_before_downloading(tmp_path, monkeypatch):
    from jmoshi_cli.cache import artifacts
    from jmoshi_cli.cache.hub import Artifact
    from jmoshi_cli.errors import CacheError
    from jmoshi_cli.variants import load_catalogue

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    huge = Artifact("moshi", EXT, "model.safetensors", "main", "0" * 40, size=10**18)
    plan = artifacts.Plan(load_catalogue().get("ext"), [artifacts.Entry(huge)], offline=False)
    try:
        artifacts.download(plan)
    except CacheError as exc:
        assert "not enough disk space" in exc.message and "HF_HUB_CACHE" in exc.hint
    else:
        raise AssertionError("a download larger than the disk was not refused")
    assert list(tmp_path.iterdir()) == []


# --- what a person sees: each file's own time, a total, and hashing as progress ---------------------


def test_each_file_line_gives_its_own_time_and_the_summary_the_total(env, hub):
    hub.slow_delay = 0.005  # the weights take a few seconds; the files after them a fraction of one
    hub.add_fault(EXT, "model.safetensors", "slow")
    result = run_cli("download", env=env)
    assert result.returncode == 0, result.stderr
    seconds = {m[0]: float(m[1]) for m in re.findall(r"^done \S+/([^/:]+): .* in ([\d.]+) s \(", result.stderr, re.M)}
    assert seconds["model.safetensors"] >= 1.0, result.stderr
    assert seconds["tokenizer_spm_32k_3.model"] < 1.0, result.stderr
    summary = re.search(r"^downloaded 4 file\(s\): ([\d.]+) MB in ([\d.]+) s", result.stderr, re.M)
    assert summary and float(summary[2]) >= seconds["model.safetensors"], result.stderr


def view_entry(size: int):
    from jmoshi_cli.cache.artifacts import Entry, Status
    from jmoshi_cli.cache.hub import Artifact

    return Entry(Artifact("moshi", EXT, "model.safetensors", "main", "0" * 40, size=size, sha256="a" * 64),
                 status=Status.COMPLETE)


def test_view_shows_a_long_hash_as_progress(capsys):
    from jmoshi_cli.render import DownloadView

    entry = view_entry(3 * 10**9)
    with DownloadView(None) as view:
        view.HASH_QUIET_S = view.PLAIN_EVERY_S = 0.0
        for done in (10**9, 2 * 10**9, 3 * 10**9):
            view.hashing(entry, done)
    err = capsys.readouterr().err
    assert "verifying nu-dialogue/j-moshi-ext/model.safetensors: 1.00 GB of 3.00 GB hashed" in err
    assert "3.00 GB of 3.00 GB hashed" in err


def test_view_keeps_quiet_about_a_quick_hash(capsys):
    from jmoshi_cli.render import DownloadView

    entry = view_entry(300_000)
    with DownloadView(None) as view:
        view.hashing(entry, 300_000)
    assert capsys.readouterr().err == ""


def test_view_times_each_file_from_its_own_start(capsys):
    from dataclasses import replace

    from jmoshi_cli.cache.artifacts import Status
    from jmoshi_cli.render import DownloadView

    first, second = view_entry(10**6), replace(view_entry(10**6), artifact=replace(
        view_entry(10**6).artifact, filename="tokenizer_spm_32k_3.model"))
    with DownloadView(None) as view:
        view.progress(replace(first, status=Status.MISSING), 0)
        time.sleep(0.5)
        view.progress(first, 10**6)
        view.progress(replace(second, status=Status.PARTIAL), 400_000)
        view.progress(second, 10**6)
    err = capsys.readouterr().err
    assert "done nu-dialogue/j-moshi-ext/tokenizer_spm_32k_3.model: 1.0 MB (0.6 MB this run) in 0.0 s" in err
    assert "downloading nu-dialogue/j-moshi-ext/tokenizer_spm_32k_3.model (1.0 MB, resuming at 0.4 MB)" in err
    total = re.search(r"downloaded 2 file\(s\): 1.6 MB in ([\d.]+) s", err)
    assert total and float(total[1]) >= 0.5, err
