"""J-Moshi's text as a person reads it: pieces timed by frame, joined without spurious spaces.

J-Moshi emits one text token per 80 ms frame, most of them padding. :func:`timed_pieces` keeps the
others with their frame and time, :func:`join_pieces` turns SentencePiece pieces into text, and
:func:`document` is the ``.transcript.json`` of one input. Plain Python: no numpy or torch, so the
joining rule can be used and tested without the model's stack.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .infer.inputs import UserAudio

# Text ids never shown (as moshi.server): 0 and 3 (J-Moshi's padding). Control pieces are dropped too.
SKIPPED_TEXT_IDS = (0, 3)

ALIGNMENT = ("piece at frame t: J-Moshi's text for output frame t, which starts at t * frame_s in .jmoshi.wav "
             "and .dialogue.wav, while the user's frame t plays")

# Scripts written without spaces between words (and their punctuation).
_NO_SPACE_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x2E80, 0x2FFF),  # CJK radicals, Kangxi, ideographic description
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」 and the ideographic space)
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x31FF),  # Bopomofo, Hangul compatibility jamo... Katakana phonetic extensions
    (0x3200, 0x33FF),  # enclosed CJK, CJK compatibility
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # full-width and half-width forms (！？（）ｶﾅ, full-width letters)
    (0x20000, 0x3FFFF),  # CJK extensions B and later
)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_MARKER_RUN = re.compile("\u2581+")


def _no_space_script(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _NO_SPACE_RANGES)


def _decode_pieces(pieces: Iterable[str]) -> str:
    """Concatenate pieces, byte-fallback pieces (``<0xE3>``...) decoded as UTF-8."""
    raw = bytearray()
    for piece in pieces:
        m = _BYTE_PIECE.fullmatch(piece)
        raw += bytes([int(m.group(1), 16)]) if m else piece.encode("utf-8")
    return raw.decode("utf-8", errors="replace")


def join_pieces(pieces: Iterable[str]) -> str:
    """Join SentencePiece pieces into text without the spurious spaces of Japanese.

    SentencePiece marks a word start with ``▁`` (U+2581), and upstream shows each as a space,
    which puts spaces inside Japanese sentences. Rule: each run of ``▁`` becomes one space when
    the characters on both sides of it are outside the scripts written without spaces (Japanese
    kana and kanji, CJK punctuation such as 、。, full-width forms, Chinese, Thai...) and is
    dropped otherwise; a run at the start or the end is dropped. So ``▁こんにちは ▁今日は`` gives
    ``こんにちは今日は``, ``▁Hello , ▁world`` gives ``Hello, world`` and ``▁3 ▁時`` gives ``3時``.
    Byte-fallback pieces (``<0xE3>``...) are decoded as UTF-8.
    """
    text = _decode_pieces(pieces)

    def repl(m: re.Match[str]) -> str:
        start, end = m.start(), m.end()
        if start == 0 or end == len(text):
            return ""
        before, after = text[start - 1], text[end]
        if before.isspace() or after.isspace() or _no_space_script(before) or _no_space_script(after):
            return ""
        return " "

    return _MARKER_RUN.sub(repl, text)


# --- the same text, piece by piece, as it is sent to a browser -----------------------------------------

MARKER = "\u2581"


def spaced(before: str, after: str) -> bool:
    """Whether a ``▁`` run between these two characters is shown as a space (transcript's rule)."""
    return join_pieces((before, MARKER, after)) != before + after


class PieceJoiner:
    """Feed pieces in order; each call returns the text to send now (often the piece, sometimes "").

    The concatenation of what it returns is ``join_pieces`` of every piece fed so far, except a
    trailing ``▁`` run or an unfinished UTF-8 sequence of byte pieces, which wait for the next piece.
    """

    def __init__(self) -> None:
        self.last = ""  # the last character sent
        self.marker = False  # a ▁ run waits for the next character
        # Pieces are bytes to it, as to join_pieces: byte-fallback pieces (<0xE3>...) finish a character
        # together, and an unfinished one waits for its next bytes.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: str) -> str:
        byte = _BYTE_PIECE.fullmatch(piece)
        data = bytes([int(byte.group(1), 16)]) if byte else piece.encode("utf-8")
        return "".join(self._chars(self.decoder.decode(data)))

    def _chars(self, text: str):
        for ch in text:
            if ch == MARKER:
                self.marker = True
                continue
            if self.marker and self.last and spaced(self.last, ch):
                yield " "
            self.marker = False
            self.last = ch
            yield ch


def _shown(tid: int, tokenizer: Any) -> bool:
    if tid in SKIPPED_TEXT_IDS or not 0 <= tid < tokenizer.get_piece_size():
        return False
    return not tokenizer.is_control(tid)


def timed_pieces(text_ids: Sequence[int], tokenizer: Any, frame_s: float) -> list[dict[str, Any]]:
    """The pieces a person should see, as dicts of frame, time_s, id and piece.

    ``text_ids`` holds one id per output frame; ``tokenizer`` is the model's
    ``sentencepiece.SentencePieceProcessor``.
    """
    return [{"frame": frame, "time_s": round(frame * frame_s, 3), "id": tid, "piece": tokenizer.id_to_piece(tid)}
            for frame, tid in enumerate(text_ids) if _shown(tid, tokenizer)]


def document(source: Path, user: UserAudio, segments: Sequence[tuple[int, int]], sampling: dict[str, Any],
             pieces: list[dict[str, Any]], *, sample_rate: int, frame_s: float) -> dict[str, Any]:
    """The ``.transcript.json`` of one input: where it came from, how it was cut and sampled, the text."""
    return {
        "source": str(source),
        "sample_rate": sample_rate,
        "frame_s": frame_s,
        "frames": user.frames,
        "input_s": round(user.input_s, 6),
        "input_sample_rate": user.input_rate,
        "channel": user.channel,
        "alignment": ALIGNMENT,
        "segments": [{"start_frame": a, "frames": b - a} for a, b in segments],
        "sampling": sampling,
        "pieces": pieces,
        "text": join_pieces(p["piece"] for p in pieces),
    }
