"""Consent before recording, in a real browser (Debian's chromium through chromedriver, headless): the
printed URL opens the consent page, not the web UI; before "I agree" the page cannot open a
conversation; after it, the web UI loads, the browser talks, and meta.json says when it agreed. Also
what the recording folder looks like on disk: private under umask 022, none for a silent client."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import child_env
from jmoshi_cli.selftest import free_port, speech_like
from jmoshi_cli.serving.chat import ChatRefused

from helpers import AUTH, LOAD_S, PAGE_TALK, Served, converse_sync, got, opus_chunks, wait_until

pytestmark = pytest.mark.slow

@pytest.mark.usefixtures("tiny_downloaded")
def test_the_consent_page_gates_the_conversation_in_a_real_browser_and_recordings_stay_private(tiny_env, tmp_path,
                                                                                                   browser):
    study, words = tmp_path / "study", tmp_path / "consent.txt"
    words.write_text("名古屋大学 対話研究室の実験です。Lab study 42.", encoding="utf-8")
    port = free_port()
    old = os.umask(0o022)  # inherited by jmoshi and its server child: the recordings must not follow it
    try:
        served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), "--record", str(study),
                         "--consent", str(words), "--idle-timeout", "5"], child_env(tiny_env))
    finally:
        os.umask(old)
    try:
        url = served.wait_ready(LOAD_S)
        # A program (no Origin) with the token is the operator's own client: no consent asked. One that sends
        # no audio is ended by the idle timeout and leaves no folder.
        _silent_conversation(port)
        served.wait_for("conversation ended: no audio from the client")
        assert not _sessions(study)
        converse_sync(f"ws://127.0.0.1:{port}/api/chat", speech_like(1.5), until=got())
        wait_until(lambda: len(list(study.glob("*/transcript.json"))) == 1, 60, "the program's recording")
        # A browser: the printed URL opens the consent page, not the web UI.
        browser.get(url)
        assert "この会話は録音されます" in browser.page_source and "Lab study 42." in browser.page_source
        assert "?token=" not in browser.current_url  # the token went into a cookie
        chat = f"ws://127.0.0.1:{port}/api/chat"
        [before] = browser.execute_async_script(PAGE_TALK, chat, [], 1, False)
        assert not before["open"] and not before["handshake"], before
        browser.find_element("id", "agree").click()
        wait_until(lambda: "J-Moshi test UI" in browser.page_source, 60, "the web UI after I agree")
        [after] = browser.execute_async_script(PAGE_TALK, chat, opus_chunks(2.0), 1, False)
        assert after["handshake"] and after["audio"] >= 3, after
        wait_until(lambda: len(list(study.glob("*/transcript.json"))) == 2, 60, "the browser's recording")
        served.wait_for("a participant agreed to be recorded")
    finally:
        served.stop()
    program, browser_session = (json.loads((p / "meta.json").read_text())["consent"] for p in _sessions(study))
    assert program["client"] == "program" and not program["asked"], program
    assert browser_session["asked"] and browser_session["client"] == "browser", browser_session
    assert browser_session["given_utc"].endswith("Z"), browser_session
    assert stat.S_IMODE(study.stat().st_mode) == 0o700
    for session in _sessions(study):
        assert stat.S_IMODE(session.stat().st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in session.iterdir()}
        assert set(modes) >= {"dialogue.wav", "user.wav", "jmoshi.wav", "meta.json", "transcript.json"}
        assert set(modes.values()) == {0o600}, modes


def _sessions(study: Path) -> list[Path]:
    return sorted(p for p in study.iterdir() if p.is_dir())  # named by their start time: oldest first


@pytest.mark.usefixtures("tiny_downloaded")
def test_a_recorded_conversation_does_not_start_below_the_free_space_floor(tiny_env, tmp_path):
    study = tmp_path / "study"
    port = free_port()
    floor_mb = shutil.disk_usage(tmp_path).free // 2**20 + 10**6  # more than this disk will ever have free
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), "--record", str(study),
                     "--min-free-mb", str(floor_mb)], child_env(tiny_env))
    try:
        served.wait_ready(LOAD_S)
        with pytest.raises(ChatRefused) as refused:
            converse_sync(f"ws://127.0.0.1:{port}/api/chat", speech_like(1.0), until=got())
        served.wait_for("a conversation was turned away: less than")
    finally:
        served.stop()
    assert refused.value.status == 503
    assert not _sessions(study)


def _silent_conversation(port: int) -> None:
    import asyncio

    async def hold() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{port}/api/chat", headers=AUTH) as ws:
                async for _ in ws:  # until the server ends it
                    pass

    asyncio.run(asyncio.wait_for(hold(), 120))
