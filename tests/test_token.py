"""The access token and the flags around it, without a server: made once and kept private, chosen from the
flags, the environment and the file in that order; the limits a visit is held to; the ready line."""

from __future__ import annotations

import stat

import pytest

from conftest import TEST_TOKEN, run_cli
from jmoshi_cli.backends.contract import Access, ChildContract, Launch, Limits
from jmoshi_cli.errors import UsageError
from jmoshi_cli.serving import access, token, visits


def test_a_token_is_made_once_kept_0600_and_survives_restarts(tmp_path, monkeypatch):
    monkeypatch.delenv(token.ENV, raising=False)
    first = token.choose(tmp_path)
    assert first.source is token.Source.NEW and token.ALLOWED.fullmatch(first.value)
    assert stat.S_IMODE((tmp_path / token.FILE).stat().st_mode) == 0o600
    again = token.choose(tmp_path)
    assert (again.value, again.source) == (first.value, token.Source.KEPT)
    renewed = token.choose(tmp_path, new=True)
    assert renewed.value != first.value and token.choose(tmp_path).value == renewed.value
    (tmp_path / token.FILE).chmod(0o644)  # restored from a backup with the umask's bits
    token.choose(tmp_path)
    assert stat.S_IMODE((tmp_path / token.FILE).stat().st_mode) == 0o600


def test_the_flag_then_the_environment_then_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(token.ENV, TEST_TOKEN)
    assert token.choose(tmp_path) == token.Choice(TEST_TOKEN, token.Source.GIVEN)
    assert token.choose(tmp_path, given="another-token-0123456789").value == "another-token-0123456789"
    assert token.choose(tmp_path, off=True) == token.Choice(None, token.Source.NONE)
    assert not (tmp_path / token.FILE).exists()  # a given token is for this run only
    for bad in ("short", "has space 0123456789", "a\nnewline-0123456789", "x" * 300):
        with pytest.raises(UsageError):
            token.choose(tmp_path, given=bad)
    with pytest.raises(UsageError):
        token.choose(tmp_path, given=TEST_TOKEN, off=True)


def test_comparison_and_cookie_name():
    assert token.same(TEST_TOKEN, TEST_TOKEN) and not token.same(TEST_TOKEN[:-1] + "x", TEST_TOKEN)
    assert not token.same(None, TEST_TOKEN)
    name = token.cookie_name(TEST_TOKEN)
    assert name.startswith("jmoshi-token-") and TEST_TOKEN not in name
    assert name != token.cookie_name("another-token-0123456789")


def test_access_flags_are_checked_before_anything_starts(tmp_path):
    decided = access.decide(access.AccessOptions(token=TEST_TOKEN, allow_origins=("https://Lab.Example.org/",),
                                                 max_minutes=2), tmp_path, record=False)
    assert decided.access.allow_origins == ("https://lab.example.org",) and decided.limits.max_s == 120
    assert decided.access.consent is None and len(decided.access.secret) == 32
    assert access.decide(access.AccessOptions(token=TEST_TOKEN), tmp_path, record=True).access.consent == ""
    consent = tmp_path / "consent.txt"
    consent.write_text("研究の説明", encoding="utf-8")
    assert access.decide(access.AccessOptions(token=TEST_TOKEN, consent_file=consent), tmp_path,
                         record=True).access.consent == "研究の説明"
    for bad in (dict(idle_s=1), dict(max_minutes=0), dict(max_waiting=-1), dict(allow_origins=("lab.example.org",)),
                dict(allow_origins=("https://lab.example.org/page",)), dict(consent_file=tmp_path / "none.txt")):
        with pytest.raises(UsageError):
            access.decide(access.AccessOptions(token=TEST_TOKEN, **bad), tmp_path, record=True)
    with pytest.raises(UsageError, match="--consent without --record"):
        access.decide(access.AccessOptions(token=TEST_TOKEN, consent_file=consent), tmp_path, record=False)


def test_a_visit_is_overdue_when_silent_or_past_its_time():
    visit = visits.Visit(visits.Client.BROWSER)
    assert visit.overdue(1000.0, 30, None) is None  # still waiting for the slot: no clock runs
    visit.started = visit.last_audio = 100.0
    assert visit.overdue(129.0, 30, None) is None
    assert visit.overdue(131.0, 30, None) is visits.End.IDLE
    visit.last_audio = 200.0
    assert visit.overdue(201.0, 30, 60) is visits.End.TIME_LIMIT


def test_the_printed_url_carries_the_token_and_contract_round_trips():
    contract = ChildContract(access=Access(TEST_TOKEN, ("https://lab.example.org",), "", "s" * 32),
                             limits=Limits(10, 600, 2, 100))
    assert ChildContract.from_env(contract.to_env()) == contract
    launch = Launch([], {}, "0.0.0.0", 8998, "https", contract)
    assert launch.url == "https://127.0.0.1:8998/"
    assert launch.page_url() == f"https://127.0.0.1:8998/?token={TEST_TOKEN}"
    assert launch.page_url("192.168.1.20") == f"https://192.168.1.20:8998/?token={TEST_TOKEN}"
    assert Launch([], {}, "127.0.0.1", 8998, "http").page_url() == "http://127.0.0.1:8998/"


def test_bad_access_flags_are_usage_errors(tiny_env):
    from conftest import child_env

    env = child_env(tiny_env)
    for flags in (["--token", "short"], ["--no-token", "--new-token"], ["--idle-timeout", "0"],
                  ["--allow-origin", "nope"], ["--consent", "x.txt"], ["--metrics-host", "127.0.0.1"]):
        done = run_cli("serve", "--variant", "tiny", "--device", "cpu", *flags, env=env)
        assert done.returncode == 2 and done.stderr.count("error:") == 1, (flags, done.stderr)
        assert "Traceback" not in done.stderr


def test_the_ready_line_gives_the_lan_urls_with_the_token_a_qr_code_and_warns_without_a_token(monkeypatch, capsys):
    from jmoshi_cli import addresses, render

    monkeypatch.setattr(addresses, "lan_addresses", lambda: ["192.168.1.20"])
    render.show_ready(Launch([], {}, "0.0.0.0", 8998, "https", ChildContract(access=Access(TEST_TOKEN))), 1.0)
    shown = capsys.readouterr().err
    assert f"on the network: https://192.168.1.20:8998/?token={TEST_TOKEN}" in shown
    assert "QR code of" in shown and "▀" in shown and "anyone on the network" not in shown
    render.show_ready(Launch([], {}, "0.0.0.0", 8998, "https", ChildContract()), 1.0)
    assert "anyone on the network can talk to J-Moshi" in capsys.readouterr().err
    render.show_ready(Launch([], {}, "127.0.0.1", 8998, "http", ChildContract(access=Access(TEST_TOKEN))), 1.0)
    shown = capsys.readouterr().err
    assert f"?token={TEST_TOKEN}" in shown and "QR code" not in shown and "on the network" not in shown
