"""A user's variants.toml of the wrong shape: one line naming the file and the key, exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli
from jmoshi_cli.errors import ConfigError
from jmoshi_cli.variants import load_catalogue

MINE = '[variants.mine]\nrepo = "lab/mine"\n'


def variants_env(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "variants.toml"
    path.write_text(text)
    return {"JMOSHI_VARIANTS": str(path), "JMOSHI_HOME": str(tmp_path / "home"), "NO_COLOR": "1",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def assert_one_line(result, path: Path, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}: {message}"], result.stderr


@pytest.mark.parametrize(("text", "message"), [
    ('variants = "x"\n', "variants must be a table, not a string"),
    ("default = []\n", "default must be a string, not an array"),
    ("[variants]\nmine = 3\n", "variants.mine must be a table, not a number"),
    (MINE + "moshi_weight = 5\n", "variants.mine.moshi_weight must be a string, not a number"),
    (MINE + "lora = true\n", "variants.mine.lora must be a string, not a boolean"),
    (MINE + "description = ['a']\n", "variants.mine.description must be a string, not an array"),
    (MINE + "revision = {sha = 'x'}\n", "variants.mine.revision must be a string, not a table"),
    (MINE + 'vram_gb = "24"\n', "variants.mine.vram_gb must be a number of GB (0 or more)"),
    (MINE + "vram_min_gb = true\n", "variants.mine.vram_min_gb must be a number of GB (0 or more)"),
    (MINE + "lm_gb = -1\n", "variants.mine.lm_gb must be a number of GB (0 or more)"),
    ("[variants.mine]\ndescription = 'no repo'\n", "variants.mine.repo is missing"),
    ("[variants.mine]\nrepo = 7\n", "variants.mine.repo must be a string, not a number"),
    ("[variants.mine]\nrepo = 'no-slash'\n", "variants.mine.repo must look like 'org/name', not 'no-slash'"),
    (MINE + "colour = 'red'\n", "variants.mine has unknown key(s) colour"),
    ('web_ui = "x"\n', "web_ui must be a table, not a string"),
    ("[web_ui]\nrepo = 'a/b'\n", "web_ui.file is missing"),
    ("[web_ui]\nrepo = 'a/b'\nfile = 'dist.tgz'\nrevision = 3\n", "web_ui.revision must be a string, not a number"),
])
def test_a_malformed_file_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    env = variants_env(tmp_path, text)
    assert_one_line(run_cli("variants", env=env), tmp_path / "variants.toml", message)


@pytest.mark.parametrize(("key", "name"), [
    ("moshi", "../other/model.safetensors"),
    ("moshi", "weights/../../model.safetensors"),
    ("tokenizer", "/etc/passwd"),
    ("mimi", "..\\mimi.safetensors"),
    ("mimi", "C:/mimi.safetensors"),
    ("moshi", ".."),
    ("tokenizer", ""),
])
def test_a_hub_file_name_outside_the_repo_is_refused(tmp_path, key, name):
    env = variants_env(tmp_path, MINE + f"{key} = '{name}'\n")
    assert_one_line(run_cli("variants", env=env), tmp_path / "variants.toml",
                    f"variants.mine.{key} must be a file name inside the repo, not {name!r}")


def test_the_web_ui_file_name_is_a_hub_file_name_too(tmp_path):
    env = variants_env(tmp_path, "[web_ui]\nrepo = 'a/b'\nfile = '../dist.tgz'\n")
    assert_one_line(run_cli("variants", env=env), tmp_path / "variants.toml",
                    "web_ui.file must be a file name inside the repo, not '../dist.tgz'")


def test_hub_names_in_subfolders_and_local_paths_with_dots_are_allowed(tmp_path, monkeypatch):
    """moshi_weight and lora are paths on this machine: `..` and absolute ones are theirs to use."""
    (tmp_path / "conf").mkdir()
    env = variants_env(tmp_path / "conf", MINE + "moshi = 'ckpt/v2..final.safetensors'\ntokenizer = 'tok.model'\n"
                       "moshi_weight = '../runs/model.safetensors'\nlora = '/srv/adapters/lora.safetensors'\n")
    monkeypatch.setenv("JMOSHI_VARIANTS", env["JMOSHI_VARIANTS"])
    mine = load_catalogue().get("mine")
    assert mine.moshi == "ckpt/v2..final.safetensors" and mine.tokenizer == "tok.model"
    assert Path(mine.moshi_weight) == tmp_path / "conf" / ".." / "runs" / "model.safetensors"
    assert mine.lora == "/srv/adapters/lora.safetensors"
    result = run_cli("variants", env=env)
    assert result.returncode == 0 and "mine  lab/mine" in result.stderr, result.stderr


def test_the_error_is_the_catalogue_error_with_exit_2(tmp_path, monkeypatch):
    env = variants_env(tmp_path, MINE + "mimi = '/abs.safetensors'\n")
    monkeypatch.setenv("JMOSHI_VARIANTS", env["JMOSHI_VARIANTS"])
    with pytest.raises(ConfigError) as caught:
        load_catalogue()
    assert caught.value.exit_code == 2 and caught.value.hint
