"""`serve --conversations N`: N conversations on one loaded J-Moshi, end to end on the real server child
(tiny model, CPU, real websockets): four clients talk at once and each gets its own voice and Japanese
text and its own recording, a fifth waits for a slot and talks when one hangs up, a client that stalls
does not stall the others, and kill -9 of jmoshi leaves nothing. One server for the module; the last
test kills it."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from conftest import TEST_TOKEN
from jmoshi_cli import runtime
from jmoshi_cli.selftest import speech_like

from helpers import (
    ANSWER_S,
    PAGE_TALK,
    alive,
    children_of,
    converse,
    got,
    japanese,
    module_server,
    opus_chunks,
    wait_until,
)

pytestmark = pytest.mark.slow
SLOTS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_hub_root):
    if not runtime.detect().has_slot_masks:
        pytest.skip("this moshi predates per-slot reset and exec masks (0.2.5): serve refuses --conversations")
    tmp = tmp_path_factory.mktemp("conversations")
    with module_server(tmp, tiny_hub_root, "--conversations", str(SLOTS), "--record", str(tmp / "rec"),
                       "--seed", "7") as (served, port):
        yield served, port, tmp / "rec"


def _url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/api/chat"


def _voice(i: int, seconds: float):
    """A different voice for each client: the test signal shifted and scaled."""
    import numpy as np

    return (np.roll(speech_like(seconds), 3000 * i) * (0.6 + 0.1 * (i % 4))).astype(np.float32)


def _sessions(folder) -> list[dict]:
    return [json.loads(meta.read_text()) for meta in sorted(folder.glob("*/meta.json"))] if folder.exists() else []


async def _talk_at_once(port: int, count: int, seconds: float = 2.0) -> list:
    voices = [_voice(i, seconds) for i in range(count)]
    return await asyncio.gather(*(converse(_url(port), pcm, until=got(1, 1)) for pcm in voices))


def test_four_clients_talk_at_once_each_with_its_own_voice_text_and_recording(server):
    served, port, rec = server
    before = len(_sessions(rec))
    results = asyncio.run(_talk_at_once(port, SLOTS))
    for result in results:
        assert result.audio_samples > 0 and japanese(result.text), result
    # They talked at the same time: every handshake came before any of them was done (no one waited).
    assert max(r.handshake_s for r in results) < ANSWER_S / 2
    wait_until(lambda: len([m for m in _sessions(rec)[before:] if m["ended"] == "hang-up"]) >= SLOTS, ANSWER_S,
               lambda: f"four finished recordings in {rec}: {_sessions(rec)}")
    recorded = _sessions(rec)[before:]
    assert sorted(m["slot"] for m in recorded) == list(range(SLOTS))
    assert all(m["frames"] > 0 and m["seeded"] == "at the start of each conversation" for m in recorded), recorded
    for folder in sorted(p.parent for p in rec.glob("*/meta.json"))[before:]:
        assert {"user.wav", "jmoshi.wav", "transcript.json"} <= {p.name for p in folder.iterdir()}, folder
    assert "4 conversations at once" in served.err and "holding 4 conversations at once" in served.err


def test_a_fifth_waits_for_a_slot_and_talks_when_one_hangs_up(server):
    _, port, _ = server

    async def scene():
        loop = asyncio.get_running_loop()
        shaken: list[float] = []
        long = [converse(_url(port), _voice(i, 6.0), until=got(1, 0),
                         on_handshake=lambda: shaken.append(loop.time())) for i in range(SLOTS)]
        holders = [asyncio.ensure_future(c) for c in long]
        left: list[float] = []
        for holder in holders:
            holder.add_done_callback(lambda _: left.append(loop.time()))
        await _until(lambda: len(shaken) == SLOTS, "four conversations under way")
        fifth = asyncio.ensure_future(converse(_url(port), _voice(9, 1.0), until=got(1, 0),
                                               on_handshake=lambda: shaken.append(loop.time())))
        done = await asyncio.gather(*holders)
        last = await fifth
        return done, last, shaken, min(left)

    done, last, shaken, first_left = asyncio.run(scene())
    assert all(r.audio_samples > 0 for r in done) and last.audio_samples > 0
    assert len(shaken) == SLOTS + 1 and shaken[-1] >= first_left  # its slot came once one of the four had left


def test_a_client_that_stalls_does_not_hold_the_others(server):
    _, port, _ = server

    async def scene():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(_url(port), headers={"Authorization": f"Bearer {TEST_TOKEN}"}) as stalled:
                assert (await stalled.receive_bytes(timeout=ANSWER_S)) == b"\x00"  # in a slot, then silent
                return await converse(_url(port), _voice(3, 2.0), until=got(1, 1))

    result = asyncio.run(scene())
    assert result.audio_samples > 0 and japanese(result.text)


def test_a_browser_holds_two_conversations_at_once_through_the_web_ui(server, browser):
    served, port, _ = server
    browser.get(f"http://127.0.0.1:{port}/?token={TEST_TOKEN}")
    browser.find_element("id", "agree").click()  # recorded: the consent page comes first
    wait_until(lambda: "J-Moshi test UI" in browser.page_source, 60, "the web UI after I agree")
    both = browser.execute_async_script(PAGE_TALK, f"ws://127.0.0.1:{port}/api/chat", opus_chunks(2.0), 2, True)
    for seen in both:
        assert seen["handshake"] and seen["audio"] >= 3 and japanese(seen["text"]), both


def test_kill_9_of_jmoshi_leaves_nothing(server):
    served, _, _ = server
    tree = children_of(served.process.pid)
    assert tree, "the server child"
    grandchildren = [pid for child in tree for pid in children_of(child)]
    served.process.send_signal(signal.SIGKILL)
    served.process.wait(30)
    wait_until(lambda: not any(alive(pid) for pid in tree + grandchildren), 30, "the conversation server to die")


async def _until(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ANSWER_S
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {ANSWER_S} s: {what}")
        await asyncio.sleep(0.05)
