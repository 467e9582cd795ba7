"""The MLX server's text joiner: piece by piece, the same text as transcript.join_pieces (plain Python)."""

from __future__ import annotations

import random

import pytest

from jmoshi_cli.transcript import PieceJoiner, join_pieces

PIECES = ["▁", "▁こんにちは", "今日", "は", "、", "。", "▁Hello", ",", "▁world", "▁3", "▁時", "▁", "ね", "▁ok",
          "<0xE3>", "<0x81>", "<0x82>", "▁(", "▁a", "b▁", "！", "▁▁", "▁ﾃｽﾄ"]


def streamed(pieces: list[str]) -> str:
    joiner = PieceJoiner()
    return "".join(joiner.feed(piece) for piece in pieces)


@pytest.mark.parametrize("pieces, text", [
    (["▁こんにちは", "▁今日", "は"], "こんにちは今日は"),
    (["▁Hello", ",", "▁world"], "Hello, world"),
    (["▁3", "▁時"], "3時"),
    (["▁うん", "▁", "▁OK", "▁です"], "うんOKです"),
    (["<0xE3>", "<0x81>", "<0x82>", "▁a"], "あa"),
])
def test_known_sentences_come_out_as_transcript_writes_them(pieces, text):
    assert streamed(pieces) == join_pieces(pieces) == text


def test_any_sequence_streams_to_what_join_pieces_makes_of_the_whole():
    rng = random.Random(0)
    for _ in range(5000):
        # A last "。" settles what waits for a next piece (a ▁ run, an unfinished UTF-8 sequence).
        pieces = [rng.choice(PIECES) for _ in range(rng.randint(0, 12))] + ["。"]
        assert streamed(pieces) == join_pieces(pieces), pieces


def test_a_space_waits_for_the_next_piece_and_a_partial_character_for_its_bytes():
    joiner = PieceJoiner()
    assert joiner.feed("▁Hello") == "Hello"
    assert joiner.feed("▁") == ""  # the next character decides
    assert joiner.feed("world") == " world"
    assert joiner.feed("<0xE3>") == ""
    assert joiner.feed("<0x81>") == ""
    assert joiner.feed("<0x82>") == "あ"
