"""What a person should see of moshi.server's output: a small state machine over its lines.

moshi.server is another program, so its lines are all there is to go on, and this module is where
they are read by their text: upstream's log format (``[Info] frame handled in 93.1ms``), aiohttp's
request-error log, and Python's traceback and warning formats. It decides what each line is and
keeps nothing but counts; render.server_relay decides how that looks (and --verbose bypasses it).

- Per-frame timings become a `FrameStats` every SUMMARY_EVERY_S seconds of conversation, and one
  for the whole conversation when it ends.
- A browser that hangs up while the server is still sending makes aiohttp log a ~20-line traceback
  ending in "Cannot write to closing transport"; it becomes one HUNG_UP event. Every other traceback
  comes through whole, and so does this one if it turns out to be part of a chain.
- Known harmless lines (import-time warnings, upstream's own "open this URL" banner that jmoshi's
  ready line replaces) are QUIET.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from enum import Enum

FRAME_BUDGET_MS = 80.0  # one Mimi frame is 80 ms of audio: handling it any slower falls behind
SUMMARY_EVERY_S = 10.0

ANSI = re.compile(r"\x1b\[[0-9;]*m")
UPSTREAM = re.compile(r"^\[(Info|Warn|Err ?)\] (.*)$")  # moshi.client_utils.make_log, colours removed
FRAME = re.compile(r"^frame handled in ([0-9.]+)ms$")
TEXT_TOKEN = re.compile(r"^text token '.*'$", re.DOTALL)
REQUEST_ERROR = re.compile(r"^Error handling request\b")  # aiohttp.web_protocol, before the traceback
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception, another exception occurred:",
           "The above exception was the direct cause of the following exception:")
# aiohttp >= 3.10 names it ClientConnectionResetError, older ones ConnectionResetError.
CLOSING_TRANSPORT = re.compile(r"^(?:[\w.]+\.)?(?:Client)?ConnectionResetError: Cannot write to closing transport$")

# Upstream info lines with nothing for a person: per-token text (the browser shows it), the
# receive loop ending (the handler's end follows), and the URL banner (jmoshi prints the right one).
ABSORBED_INFO = (TEXT_TOKEN, re.compile(r"^connection closed$"), re.compile(r"^Access the Web UI directly at "))
QUIET_LINES = (
    # bitsandbytes on a machine without CUDA; moshi imports it and never uses it for serving.
    re.compile(r"^The installed version of bitsandbytes was compiled without GPU support\."),
    # J-Moshi's repo has no config.json, and moshi's built-in 7B config is the right one for it.
    re.compile(r"UserWarning: Repository \S+ contains no config\.json\. Assuming this is a Moshi 7B\."),
    # aiohttp's banner: jmoshi prints its own "ready at" line with the address a browser can use.
    re.compile(r"^======== Running on \S+ ========$"),
    re.compile(r"^\(Press CTRL\+C to quit\)$"),
)
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")  # warnings.showwarning; its source line follows, indented


class Kind(Enum):
    STEP = "step"  # upstream's loading and serving steps ("loading moshi")
    QUIET = "quiet"  # a known harmless line
    CONNECTED = "connected"  # a browser asked for the conversation
    HUNG_UP = "hung up"  # a conversation ended: the browser left (cleanly or mid-send)
    FRAMES = "frames"  # how fast frames were handled (`Event.stats`)
    TRACEBACK = "traceback"  # a traceback, every line as it came
    OTHER = "other"  # anything else, as it came


@dataclass(frozen=True)
class FrameStats:
    frames: int
    median_ms: float
    p95_ms: float
    final: bool  # True: the whole conversation, which just ended; False: the last SUMMARY_EVERY_S

    @property
    def real_time(self) -> bool:
        """Whether nearly every frame (95 %) was handled within its 80 ms of audio."""
        return self.p95_ms <= FRAME_BUDGET_MS


@dataclass(frozen=True)
class Event:
    kind: Kind
    text: str = ""  # the line(s) to show, colour codes and upstream's level prefix removed
    stats: FrameStats | None = None


def plain(line: str) -> str:
    """A line without its newline and terminal colour codes."""
    return ANSI.sub("", line.rstrip("\r\n"))


def frame_ms(line: str) -> float | None:
    """The handling time of an upstream "frame handled in N ms" line, else None."""
    upstream = UPSTREAM.match(plain(line))
    found = FRAME.match(upstream.group(2)) if upstream else None
    return float(found.group(1)) if found else None


@dataclass
class _Frames:
    """Frame times since the last periodic summary, and since the conversation began."""

    window: list[float] = field(default_factory=list)
    conversation: list[float] = field(default_factory=list)
    window_start: float | None = None

    def add(self, ms: float, now: float) -> list[Event]:
        if self.window_start is None:
            self.window_start = now
        self.window.append(ms)
        self.conversation.append(ms)
        if now - self.window_start < SUMMARY_EVERY_S:
            return []
        return self._summary(self.window, final=False)

    def end(self) -> list[Event]:
        """The conversation's summary (nothing if no frame was handled), and a fresh start."""
        done = self.conversation
        self.conversation = []
        return self._summary(done, final=True)

    def _summary(self, times: list[float], final: bool) -> list[Event]:
        self.window, self.window_start = [], None
        if not times:
            return []
        ordered = sorted(times)
        p95 = ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]  # nearest rank
        return [Event(Kind.FRAMES, stats=FrameStats(len(times), statistics.median(ordered), p95, final))]


class ServerLog:
    """Feed it the child's lines in order; it returns what to show for each (often nothing yet).

    States: plain lines; after aiohttp's request-error header (is a traceback next?); inside a
    traceback (its block is held until its last line decides what it was); after a folded hang-up
    (does a chained traceback follow? then it is shown whole after all); after a quiet warning
    (its indented source line is quiet too).
    """

    def __init__(self) -> None:
        self.frames = _Frames()
        self.block: list[str] = []  # the traceback being read, with its header when it has one
        self.header = False  # the block began with aiohttp's "Error handling request"
        self.folded: list[str] = []  # a folded hang-up's lines, until the next line rules out a chain
        self.state = self._line

    def feed(self, line: str, now: float) -> list[Event]:
        """One line as the child wrote it; "" means its output ended (as readline says)."""
        if line == "":
            return self.finish()
        return self.state(plain(line), now)

    def finish(self) -> list[Event]:
        """The output ended: show any unfinished block, and the last conversation's summary."""
        pending = [Event(Kind.TRACEBACK, "\n".join(self.block))] if self.block else []
        self.block, self.folded, self.header, self.state = [], [], False, self._line
        return pending + self.frames.end()

    # --- states: each takes a line without colour codes, returns events, may change self.state -----

    def _line(self, text: str, now: float) -> list[Event]:
        if text == TRACEBACK or REQUEST_ERROR.match(text):
            self.block, self.header = [text], text != TRACEBACK
            self.state = self._traceback if text == TRACEBACK else self._after_header
            return []
        if any(pattern.search(text) for pattern in QUIET_LINES):
            if WARNING_LINE.match(text):
                self.state = self._warning_source
            return [Event(Kind.QUIET, text)]
        upstream = UPSTREAM.match(text)
        if upstream and upstream.group(1) == "Info":
            return self._info(upstream.group(2), text, now)
        return [Event(Kind.OTHER, text)]

    def _info(self, message: str, text: str, now: float) -> list[Event]:
        frame = FRAME.match(message)
        if frame:
            return self.frames.add(float(frame.group(1)), now)
        if any(pattern.match(message) for pattern in ABSORBED_INFO):
            return [Event(Kind.QUIET, text)]
        if message == "accepted connection":
            return [Event(Kind.CONNECTED, message)]
        if message == "done with connection":
            return [Event(Kind.HUNG_UP, message), *self.frames.end()]
        return [Event(Kind.STEP, message)]

    def _after_header(self, text: str, now: float) -> list[Event]:
        if text == TRACEBACK:
            self.block.append(text)
            self.state = self._traceback
            return []
        header, self.block, self.header, self.state = self.block[0], [], False, self._line
        return [Event(Kind.OTHER, header), *self._line(text, now)]

    def _traceback(self, text: str, now: float) -> list[Event]:
        self.block.append(text)
        if text[:1].isspace():  # frames and source lines are indented; the exception line is not
            return []
        block, header = self.block, self.header
        self.block, self.header, self.state = [], False, self._line
        ended = self.frames.end() if header else []  # a request handler failed: its conversation is over
        if header and CLOSING_TRANSPORT.match(text):
            self.folded, self.state = block, self._after_fold
            return [Event(Kind.HUNG_UP, text), *ended]
        return [Event(Kind.TRACEBACK, "\n".join(block)), *ended]

    def _after_fold(self, text: str, now: float) -> list[Event]:
        if text == "":
            self.folded.append(text)  # a chained traceback would go on after this blank line
            return []
        folded, self.folded, self.state = self.folded, [], self._line
        if text in CHAINED:
            return [Event(Kind.TRACEBACK, "\n".join([*folded, text]))]
        return self._line(text, now)

    def _warning_source(self, text: str, now: float) -> list[Event]:
        self.state = self._line
        if text[:1].isspace():
            return [Event(Kind.QUIET, text)]
        return self._line(text, now)
