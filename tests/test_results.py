"""The `--json` contract of every command: its shape is pinned here, so a change to it is a decision.

Each command returns a result value (results.py) that one function prints; the shapes below are what
scripts and notebooks rely on. `shape` turns a JSON value into its skeleton: dict keys with the type
of each value (lists by their first item), so a renamed, dropped or retyped field fails here.
"""

from __future__ import annotations

import json

import pytest

from conftest import child_env, jmoshi, run_cli


def shape(value):
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def run_json(*args: str, env: dict, code: int = 0, process: bool = False):
    """The command's JSON document without its version (checked here), run in this process, or in a child
    where the command starts servers."""
    done = jmoshi(*args, "--json", env=env, timeout=300) if process else run_cli(*args, "--json", env=env)
    assert done.returncode == code, done.stderr
    document = json.loads(done.stdout)
    assert next(iter(document)) == "jmoshi_result_version" and document.pop("jmoshi_result_version") == 1
    return document


CHECK = {"name": "str", "status": "str", "detail": "str", "hint": "str"}
FILE = {"role": "str", "repo": "str", "file": "str", "commit": "str", "size": "int", "sha256": "str", "status": "str",
        "path": "str"}


def test_doctor_json(env):
    out = run_json("doctor", "--variant", "ext", env=env, code=1)  # no GPU here, or too little: a FAIL either way
    assert shape({k: v for k, v in out.items() if k != "checks"}) == {"variant": "str", "repo": "str", "ok": "bool"}
    assert {shape(c)["status"] for c in out["checks"]} == {"str"}
    assert all(set(c) == set(CHECK) for c in out["checks"])


def test_variants_json(env):
    out = run_json("variants", env=env)
    assert list(out) == ["variants"]
    ext = next(v for v in out["variants"] if v["name"] == "ext")
    assert set(ext) == {"name", "repo", "revision", "description", "moshi", "tokenizer", "mimi", "vram_gb",
                        "vram_min_gb", "vram_min_int8_gb", "lm_gb", "license", "license_url", "moshi_weight", "lora",
                        "source",
                        "default"}
    assert ext["default"] is True and isinstance(ext["vram_gb"], (int, float))


def test_download_and_verify_json(env):
    out = run_json("download", "--variant", "ext", env=env)
    assert shape(out) == {"variants": [{"variant": "str", "repo": "str", "missing_bytes": "int", "files": [FILE]}]}
    listed = run_cli("download", "--variant", "ext", env=env)
    assert listed.stdout.split() == [f["path"] for f in out["variants"][0]["files"]]  # without --json: the paths
    checked = run_json("verify", "--variant", "ext", env=env)
    assert shape(checked) == {"variants": [{"variant": "str", "files": [{"file": "str", "repo": "str", "status": "str",
                                                                         "detail": "str", "path": "str"}]}]}
    assert {f["status"] for f in checked["variants"][0]["files"]} == {"complete"}


def test_recordings_json(env, tmp_path):
    from jmoshi_cli.recording.format import write_json, write_transcript

    assert run_json("recordings", str(tmp_path), env=env) == {"sessions": []}
    session = tmp_path / "20261201T100000Z-aaaaaa"
    session.mkdir()
    write_transcript(session)
    write_json(session / "meta.json", {"format": 1, "variant": "ext", "ended": "hang-up", "duration_s": 1.5,
                                       "precision": "bf16", "start_utc": "2026-12-01T10:00:00Z"})
    out = run_json("recordings", str(tmp_path), env=env)["sessions"]
    assert set(out[0]) == {"id", "path", "start_utc", "end_utc", "duration_s", "frames", "variant", "repo", "commit",
                           "replica", "precision", "sampling", "seed", "ended", "error"}
    assert (out[0]["ended"], out[0]["precision"], out[0]["duration_s"]) == ("hang-up", "bf16", 1.5)


@pytest.mark.slow
def test_selftest_json(tiny_env):
    out = run_json("selftest", env=child_env(tiny_env), process=True)
    assert shape(out) == {"ok": "bool", "server": "str", "ready_s": "float", "handshake_s": "float",
                          "audio_samples": "int", "audio_s": "float", "text_pieces": "int", "frames_sent": "int",
                          "ms_per_frame": "float"}
    assert out["audio_samples"] > 0 and out["text_pieces"] > 0


def test_brackets_in_a_message_are_shown_as_written(env):
    """Rich reads [..] as style; an error, hint or note naming `.[mlx]` must reach the person whole."""
    from jmoshi_cli import cli
    from jmoshi_cli.errors import UsageError

    with_brackets = UsageError("cannot read /data/[study]/a.wav", "pip install '.[mlx]'")
    from jmoshi_cli.console import console

    with console.capture() as captured:
        cli.fail(with_brackets.message, with_brackets.hint, 2, with_brackets)
    assert "/data/[study]/a.wav" in captured.get() and "'.[mlx]'" in captured.get()


def test_every_result_has_a_view():
    """`cli.finish` takes any member of results.Result; each one is drawn by a view of its own in render.py."""
    import typing

    from jmoshi_cli import render, results

    members = typing.get_args(results.Result)
    assert len(members) == 8
    fallback = render.show.dispatch(object)
    assert all(render.show.dispatch(member) is not fallback for member in members)
