"""J-Moshi's text pieces as sent to the browser, joined by jmoshi's rule as they come.

moshi.server sends each SentencePiece piece with ``▁`` replaced by a space, which puts spaces inside
Japanese sentences. The MLX server sends the same text that :func:`jmoshi_cli.transcript.join_pieces`
makes of the whole conversation, piece by piece: a run of ``▁`` is held until the next character
shows whether it sits between two characters of scripts written with spaces. Plain Python.
"""

from __future__ import annotations

import codecs
import re

from ..transcript import join_pieces

MARKER = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
