"""J-Moshi's text: joining SentencePiece pieces, timing them by frame, the transcript document."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jmoshi_cli.audio_io import FRAME_S, SAMPLE_RATE
from jmoshi_cli.infer.inputs import UserAudio
from jmoshi_cli.transcript import ALIGNMENT, document, join_pieces, timed_pieces


@pytest.mark.parametrize(
    ("pieces", "text"),
    [
        (["▁こんにちは", "、", "▁今日", "は", "▁いい", "天気"], "こんにちは、今日はいい天気"),
        (["▁Hello", ",", "▁world", "."], "Hello, world."),
        (["▁3", "▁時", "に", "▁Python", "▁を"], "3時にPythonを"),
        (["▁I", "▁like", "▁寿司", "▁very", "▁much"], "I like寿司very much"),
        (["▁", "うん", "▁", "▁", "そう"], "うんそう"),
        (["▁ＡＢＣ", "▁です"], "ＡＢＣです"),
        (["▁version", "▁2", "▁ok", "▁"], "version 2 ok"),
        (["<0xE3>", "<0x81>", "<0x82>", "▁", "い"], "あい"),
        ([], ""),
    ],
)
def test_join_pieces(pieces, text):
    assert join_pieces(pieces) == text


@pytest.fixture(scope="module")
def tokenizer():
    """A real SentencePiece model: the tiny model's tokenizer."""
    import sentencepiece

    from jmoshi_cli.tiny_model import TOKENIZER_NAME, cached_tiny_repo

    return sentencepiece.SentencePieceProcessor(str(cached_tiny_repo() / TOKENIZER_NAME))


def test_timed_pieces_skip_padding_and_control_ids(tokenizer):
    size = tokenizer.get_piece_size()
    assert tokenizer.is_control(1)  # the toy tokenizer's <s>
    words = [i for i in range(4, size) if not tokenizer.is_control(i)][:3]
    ids = [0, words[0], 3, 1, words[1], -1, size, words[2]]  # padding, control and out-of-range ids
    pieces = timed_pieces(ids, tokenizer, FRAME_S)
    assert [(p["frame"], p["id"]) for p in pieces] == [(1, words[0]), (4, words[1]), (7, words[2])]
    assert [p["time_s"] for p in pieces] == [0.08, 0.32, 0.56]
    assert [p["piece"] for p in pieces] == [tokenizer.id_to_piece(i) for i in words]


def test_document_describes_the_input_and_joins_the_text():
    user = UserAudio(np.zeros(3 * 1920, np.float32), frames=3, channel="right", input_rate=32000,
                     input_s=0.2345678, input_channels=2)
    pieces = [{"frame": 0, "time_s": 0.0, "id": 10, "piece": "▁こんにちは"},
              {"frame": 2, "time_s": 0.16, "id": 11, "piece": "▁Hello"}]
    doc = document(Path("in/talk.wav"), user, [(0, 2), (2, 3)], {"temp": 0.8, "seed": None}, pieces,
                   sample_rate=SAMPLE_RATE, frame_s=FRAME_S)
    assert doc == {
        "source": "in/talk.wav", "sample_rate": 24000, "frame_s": 0.08, "frames": 3, "input_s": 0.234568,
        "input_sample_rate": 32000, "channel": "right", "alignment": ALIGNMENT,
        "segments": [{"start_frame": 0, "frames": 2}, {"start_frame": 2, "frames": 1}],
        "sampling": {"temp": 0.8, "seed": None}, "pieces": pieces, "text": "こんにちはHello",
    }


def test_importing_transcript_loads_neither_numpy_nor_torch():
    code = ("import sys, jmoshi_cli.transcript; "
            "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_browser_gets_the_text_the_transcript_says_piece_by_piece():
    """moshi.server sends each piece with every `▁` as a space; jmoshi's tap sends the transcript's text."""
    import random

    from jmoshi_cli.upstream.moshi_server import BrowserText

    class Tokenizer:
        def __init__(self, pieces):
            self.pieces = pieces

        def id_to_piece(self, token):
            return self.pieces[token]

    vocabulary = ["▁今日は", "今", "▁私は", "見", "。", "▁Hello", "▁world", ",", "▁", "▁3", "▁時", "<0xE3>", "<0x81>",
                  "<0x82>", "ね", "▁OK", "!"]
    rng = random.Random(7)
    for _ in range(300):
        pieces = [rng.choice(vocabulary) for _ in range(rng.randint(1, 12))]
        if any(p.startswith("<0x") for p in pieces):  # a byte piece only ever comes as a whole character
            pieces = [p for p in pieces if not p.startswith("<0x")] + ["<0xE3>", "<0x81>", "<0x82>"]
        browser = BrowserText(Tokenizer(pieces))
        sent = "".join(browser.id_to_piece(i) for i in range(len(pieces)))
        assert sent == join_pieces(pieces).rstrip(), pieces
        browser.conversation_starts()  # a new conversation starts without the last one's context
        assert "".join(browser.id_to_piece(i) for i in range(len(pieces))) == sent
