"""Files jmoshi derives (the int8 checkpoint here; the MLX weights in test_mlx_convert.py) are checked against
the sha256 they were written with: when they are loaded, hashed again only if their stamp changed, and always
by `jmoshi verify`. A file that no longer matches is removed and made again on the next start."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import child_env, run_cli, sha256
from jmoshi_cli import runtime
from jmoshi_cli.errors import CacheError
from jmoshi_cli.model import derived, quantize
from jmoshi_cli.tiny_model import CONFIG_NAME, MOSHI_NAME

from builders import flip_a_byte
from helpers import a_wav

RT = runtime.detect()
pytestmark = pytest.mark.skipif(not (RT.has_int8 and RT.bitsandbytes),
                                reason=f"int8 runs on the current runtime only (this is moshi {RT.moshi})")


@pytest.fixture(scope="module")
def tiny_repo() -> Path:
    from jmoshi_cli.tiny_model import cached_tiny_repo

    return cached_tiny_repo()


def make_int8(home: Path, repo: Path, source_sha256: str | None = None) -> quantize.Int8Checkpoint:
    return quantize.ensure_int8(home, repo / MOSHI_NAME, source_sha256, repo / CONFIG_NAME)


class CountedHashes:
    def __init__(self, monkeypatch):
        self.paths: list[Path] = []
        real = derived.sha256_of

        def counted(path: Path) -> str:
            self.paths.append(Path(path))
            return real(path)

        monkeypatch.setattr(derived, "sha256_of", counted)


def test_a_flipped_byte_is_refused_when_loaded_removed_and_made_again(tiny_repo, tmp_path):
    made = make_int8(tmp_path, tiny_repo)
    flip_a_byte(made.weight)
    with pytest.raises(CacheError) as refused:
        make_int8(tmp_path, tiny_repo)
    assert "int8 checkpoint" in refused.value.message and "no longer has the sha256" in refused.value.message
    assert "\n" not in refused.value.message and "run the command again" in refused.value.hint
    folder = made.weight.parent
    assert not (folder / quantize.MANIFEST).exists() and not made.weight.exists()  # the hint holds:
    remade = make_int8(tmp_path, tiny_repo)
    assert remade.made_s is not None and quantize.verify(remade)
    assert derived.unchanged(remade.weight, folder / quantize.MANIFEST)  # stamped as written


def test_a_file_whose_stamp_is_unchanged_is_not_hashed_at_each_load(tiny_repo, tmp_path, monkeypatch):
    made = make_int8(tmp_path, tiny_repo)
    hashes = CountedHashes(monkeypatch)
    make_int8(tmp_path, tiny_repo, made.source_sha256)
    assert hashes.paths == []

    os.utime(made.weight, ns=(0, made.weight.stat().st_mtime_ns + 10**9))  # the same bytes, another stamp
    notes: list[str] = []
    again = quantize.ensure_int8(tmp_path, tiny_repo / MOSHI_NAME, made.source_sha256, tiny_repo / CONFIG_NAME,
                                 notes.append)
    assert again.weight == made.weight and hashes.paths == [made.weight]
    assert any("checking the sha256" in note for note in notes)
    make_int8(tmp_path, tiny_repo, made.source_sha256)
    assert hashes.paths == [made.weight]  # the match was recorded: hashed once, not at every load


def test_a_checkpoint_made_before_stamps_were_recorded_is_hashed_once(tiny_repo, tmp_path, monkeypatch):
    made = make_int8(tmp_path, tiny_repo)
    manifest = made.weight.parent / quantize.MANIFEST
    record = json.loads(manifest.read_text())
    del record[derived.STAMP]
    manifest.write_text(json.dumps(record))
    hashes = CountedHashes(monkeypatch)
    for _ in range(2):
        assert make_int8(tmp_path, tiny_repo, made.source_sha256).weight == made.weight
    assert hashes.paths == [made.weight]


def downloaded_tiny(env: dict) -> tuple[Path, Path]:
    """The tiny variant in the cache of `env`: its LM's snapshot path, and JMOSHI_HOME."""
    assert run_cli("download", "--variant", "tiny", env=env).returncode == 0
    [lm] = Path(env["HF_HUB_CACHE"]).glob(f"models--jmoshi-test--tiny/snapshots/*/{MOSHI_NAME}")
    return lm, Path(env["JMOSHI_HOME"])


def verify_json(env: dict) -> tuple[int, list[dict], list[dict]]:
    """`jmoshi verify --json` of the tiny variant: its exit code, the hub files' rows, the derived files' rows."""
    done = run_cli("verify", "--variant", "tiny", "--json", env=env)
    assert done.stdout, done.stderr
    [variant] = json.loads(done.stdout)["variants"]
    files = variant["files"]
    return done.returncode, [f for f in files if "kind" not in f], [f for f in files if "kind" in f]


def test_verify_hashes_the_derived_files_and_removes_a_bad_one(tiny_env):
    lm, home = downloaded_tiny(tiny_env)
    made = quantize.ensure_int8(home, lm, sha256(lm), lm.parent / CONFIG_NAME)
    code, hub_rows, rows = verify_json(tiny_env)
    assert code == 0 and {f["status"] for f in hub_rows} == {"complete"}
    # A hub file's row (with the repo of the file it was made from) and two more fields.
    assert rows == [{"file": quantize.WEIGHT, "repo": "jmoshi-test/tiny", "status": "complete", "detail": "",
                     "path": str(made.weight), "kind": "int8", "made_from": MOSHI_NAME}]

    flip_a_byte(made.weight, keep_mtime=True)  # what loading may not see: verify hashes every file whole
    code, hub_rows, rows = verify_json(tiny_env)
    assert code == 1 and {f["status"] for f in hub_rows} == {"complete"}
    [row] = rows
    assert row["status"] == "corrupt" and "removed" in row["detail"] and not made.weight.exists()
    assert verify_json(tiny_env) == (0, hub_rows, [])  # nothing left to refuse


def test_verify_shows_derived_files_beside_the_hub_files(tiny_env):
    lm, home = downloaded_tiny(tiny_env)
    made = quantize.ensure_int8(home, lm, sha256(lm), lm.parent / CONFIG_NAME)
    flip_a_byte(made.weight)
    done = run_cli("verify", "--variant", "tiny", env=tiny_env)
    assert done.returncode == 1
    assert f"ok jmoshi-test/tiny/{MOSHI_NAME}" in done.stderr
    row = f"corrupt jmoshi's int8 of {MOSHI_NAME}: {made.weight} (not the sha256 it was written with; removed"
    assert row in done.stderr


def test_infer_refuses_a_bad_int8_checkpoint_in_one_line_and_the_next_start_makes_it_anew(tiny_env, tmp_path):
    lm, home = downloaded_tiny(tiny_env)
    made = quantize.ensure_int8(home, lm, sha256(lm), lm.parent / CONFIG_NAME)
    flip_a_byte(made.weight)
    args = ("infer", str(a_wav(tmp_path)), "--variant", "tiny", "--device", "cpu", "--quantize", "int8",
            "--offline", "--out", str(tmp_path / "out"))
    done = run_cli(*args, env=child_env(tiny_env))
    assert done.returncode == CacheError.exit_code, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no longer has the sha256" in errors[0] and "Traceback" not in done.stderr
    assert not made.weight.exists()
    assert quantize.ensure_int8(home, lm, sha256(lm), lm.parent / CONFIG_NAME).made_s is not None
