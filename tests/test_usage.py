"""Mistyped commands, flags and values: exit 2 (bad usage), the command's usage line, one error line with
click's own diagnosis ("Did you mean", the possible options, the allowed range), where the help is, and
never "unexpected error" or a traceback. Run in this process through the one entry point (`cli`); the real
process's exit code is checked once at the end."""

from __future__ import annotations

import pytest

from conftest import jmoshi, run_cli

COMMANDS = ("doctor", "variants", "download", "verify", "serve", "recordings", "analyze", "front", "selftest",
            "infer")
# What each command needs besides the flag under test, so that only that flag is wrong.
NEEDS = {"analyze": ["x.wav"], "infer": ["x.wav"], "front": ["--backend", "127.0.0.1:9"]}


@pytest.fixture
def quiet_env(tmp_path) -> dict:
    """Nothing reachable and nothing cached: a usage error must come before any of it matters."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_CACHE": str(tmp_path / "cache"), "JMOSHI_HOME": str(tmp_path / "home"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"), "NO_COLOR": "1"}


def assert_usage_error(done, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "unexpected error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert any(line.startswith("hint:") and "--help" in line for line in lines), done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr
    assert done.stdout == ""  # stdout is for results only


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_names_the_command_and_its_help(command, quiet_env):
    done = run_cli(command, *NEEDS.get(command, []), "--jsn", env=quiet_env)
    assert_usage_error(done, "No such option: --jsn", f"usage: jmoshi {command}", f"jmoshi {command} --help")


@pytest.mark.parametrize("argv, suggestion", [(["serve", "--varient", "ext"], "--variant"),
                                              (["doctor", "--jsn"], "--json"),
                                              (["analyze", "x.wav", "--thresold", "0.5"], "--threshold")])
def test_a_near_miss_is_named(argv, suggestion, quiet_env):
    assert_usage_error(run_cli(*argv, env=quiet_env), suggestion)


def test_unknown_command_suggests_the_near_one(quiet_env):
    assert_usage_error(run_cli("servee", env=quiet_env), "No such command 'servee'", "Did you mean 'serve'?",
                       "jmoshi --help")


def test_unknown_global_option(quiet_env):
    assert_usage_error(run_cli("--nope", "doctor", env=quiet_env), "No such option: --nope")


@pytest.mark.parametrize("argv, needle", [(["analyze"], "Missing argument"), (["infer"], "Missing argument"),
                                          (["front"], "Missing option '--backend'"),
                                          (["doctor", "--variant"], "requires an argument"),
                                          (["infer", "x.wav", "--out"], "requires an argument")])
def test_missing_argument_or_value(argv, needle, quiet_env):
    assert_usage_error(run_cli(*argv, env=quiet_env), needle, f"jmoshi {argv[0]} --help")


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--port", "abc"], "'abc' is not a valid int"),
    (["doctor", "--port", "8x"], "is not a valid int"),
    (["front", "--backend", "127.0.0.1:9", "--queue-timeout", "soon"], "is not a valid float"),
    (["infer", "x.wav", "--seed", "lucky"], "is not a valid int"),
    (["serve", "--temp", "hot"], "is not a valid float"),
    (["analyze", "x.wav", "--threshold", "5"], "is not in the range"),
    (["analyze", "x.wav", "--jmoshi-channel", "2"], "is not in the range"),
])
def test_bad_type_or_range(argv, needle, quiet_env):
    assert_usage_error(run_cli(*argv, env=quiet_env), needle)


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--backend", "gpu"], "--backend 'gpu'"), (["selftest", "--backend", "gpu"], "--backend 'gpu'"),
    (["infer", "x.wav", "--backend", "gpu"], "--backend 'gpu'"), (["serve", "--quantize", "int3"], "int3"),
    (["infer", "x.wav", "--channel", "up"], "'up'"), (["serve", "--device", "tpu"], "tpu"),
    (["download", "--variant", "nope"], "'nope'"), (["verify", "--variant", "nope"], "'nope'"),
    (["serve", "--replicas", "many"], "many"),
])
def test_bad_choice_is_one_line_with_the_choices(argv, needle, quiet_env):
    """jmoshi checks these values itself (they are plain strings to click): one line, exit 2, a hint."""
    done = run_cli(*argv, env=quiet_env)
    assert done.returncode == 2 and "unexpected error" not in done.stderr and "Traceback" not in done.stderr
    assert needle in done.stderr and "hint:" in done.stderr, done.stderr


def test_no_command_shows_the_help(quiet_env):
    done = run_cli(env=quiet_env)
    assert done.returncode == 2 and "COMMAND" in done.stdout and "serve" in done.stdout  # as `jmoshi --help`


def test_the_real_process_exits_2_with_the_same_lines(quiet_env):
    done = jmoshi("serve", "--varient", "ext", env=quiet_env, timeout=60)
    assert_usage_error(done, "No such option: --varient", "--variant", "jmoshi serve --help")
