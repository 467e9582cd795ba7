"""What the end-to-end tests share: jmoshi in a child process, the kernel's view of processes and sockets,
a client that listens until it got what a test asserts, and waiting for a condition up to a deadline.

The machine running the tests may be busy (two cores shared with other work): every wait here is for
something observable, up to a deadline long enough for a model to load on a loaded CPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as tp
import wave
from pathlib import Path

import numpy as np

from conftest import SHARED_AUDIO, TEST_TOKEN, child_env, tiny_variant_env
from jmoshi_cli import hardware, runtime
from jmoshi_cli.audio_io import FRAME_SIZE, SAMPLE_RATE
from jmoshi_cli.hardware import GPU, NvidiaFacts, Probe
from jmoshi_cli.selftest import speech_like
from jmoshi_cli.serving.chat import ChatResult, chat
from jmoshi_cli.serving.opus import OpusStream

from hub_server import LocalHub

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}  # what a program sends to a server the tests started
LOAD_S = 240.0  # a model loading (and the tiny one downloading) on a busy CPU
ANSWER_S = 120.0  # a server answering every frame it was sent, on a busy CPU slower than real time


def wait_until(predicate: tp.Callable[[], object], timeout: float, what: str | tp.Callable[[], str],
               poll_s: float = 0.1) -> None:
    """Until predicate() is true; AssertionError naming `what` (or what it returns then, for a message that
    shows the state at the deadline) once `timeout` seconds passed without it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what() if callable(what) else what}")
        time.sleep(poll_s)


# --- jmoshi in a child process ------------------------------------------------------------------------


class Running:
    """A command in a child process: the lines it prints on stdout and stderr, read as they come."""

    def __init__(self, argv: list[str], env: dict):
        self.process = subprocess.Popen(argv, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.url = ""
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.out_lines),
                                               (self.process.stderr, self.err_lines))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self.err_lines)

    def wait_ready(self, timeout: float = LOAD_S) -> str:
        """The first line on stdout: the URL jmoshi prints once it serves."""
        deadline = time.monotonic() + timeout
        while not any(line.strip() for line in self.out_lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                code, err = self.stop()
                raise AssertionError(f"never became ready (exit code {code}):\n{err[-4000:]}")
            time.sleep(0.1)
        self.url = next(line.strip() for line in self.out_lines if line.strip())
        return self.url

    def wait_for(self, text: str, count: int = 1, timeout: float = 180) -> None:
        """Until `text` has appeared `count` times on stderr (what the person has seen so far)."""
        deadline = time.monotonic() + timeout
        while self.err.count(text) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{text!r} not seen {count} time(s):\n{self.err[-4000:]}")
            time.sleep(0.1)

    def last_line_with(self, text: str) -> str:
        """The newest stderr line holding `text` ("" if none): a status that is printed again when it changes."""
        return next((line for line in reversed(list(self.err_lines)) if text in line), "")

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join(10)
        self.process.stdout.close()
        self.process.stderr.close()
        return self.process.returncode, self.err


class Served(Running):
    """`jmoshi serve` in a child process: the URL it prints when ready, its stderr as it comes."""

    def __init__(self, args: list[str], env: dict, verbose: bool = False):
        flags = ["--verbose"] if verbose else []
        super().__init__([sys.executable, "-m", "jmoshi_cli", *flags, "serve", *args], env)


@contextlib.contextmanager
def module_server(tmp: Path, hub_root: Path, *flags: str) -> tp.Iterator[tuple[Served, int]]:
    """`jmoshi serve --variant tiny --device cpu` with `flags`, on a loopback hub of its own, with the test token:
    one server a module's tests share (none of them may kill it, unless it is the module's last). (served, port)"""
    from jmoshi_cli.selftest import free_port

    with LocalHub(hub_root) as hub:
        env = dict(tiny_variant_env(tmp, hub.endpoint), JMOSHI_TOKEN=TEST_TOKEN)
        port = free_port()
        served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), *flags], child_env(env))
        try:
            served.wait_ready(LOAD_S)
            yield served, port
        finally:
            served.stop()


# --- processes and sockets, from the kernel's tables ----------------------------------------------------


def processes() -> tp.Iterator[tuple[int, list[str]]]:
    """Each process's pid and the fields of /proc/PID/stat after its name (state, ppid, pgrp, session...)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue


def children_of(pid: int) -> list[int]:
    return [child for child, fields in processes() if int(fields[1]) == pid]


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a reaper (the process holds nothing then)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def listening(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on port, read from the kernel's tables."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address if width == 32 else socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


# --- what the user says, and a client that listens until it got an answer -------------------------------


def user_audio(seconds: float = 3.0) -> np.ndarray:
    """Japanese speech from the shared corpus when this checkout has it, else a speech-like signal."""
    import sphn

    path = SHARED_AUDIO / "daily-5-0276.wav"
    if not path.is_file():
        return speech_like(seconds)
    pcm, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)
    return np.ascontiguousarray(pcm[0, : int(seconds * SAMPLE_RATE)], dtype=np.float32)


def a_wav(folder: Path) -> Path:
    """One second of silence as a 24 kHz mono WAV, for infer."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "in.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(b"\x00\x00" * SAMPLE_RATE)
    return path


def got(samples: int = 1, pieces: int = 0) -> tp.Callable[[ChatResult], bool]:
    """A condition for :func:`converse`: at least this much audio and this many text pieces came back."""
    return lambda result: result.audio_samples >= samples and len(result.text_pieces) >= pieces


def answered(pcm: np.ndarray) -> tp.Callable[[ChatResult], bool]:
    """A condition for :func:`converse`: the server answered every 80 ms frame of `pcm`.

    The server answers each frame it gets with one frame of voice and its text piece, if any (moshi.server
    0.2.13 sends the voice first, 0.2.2 and jmoshi's own server the text); the model's position 0 is silent
    and not sent, so a whole answer is one frame shorter than what was said.
    With sphn 0.1 (the documented runtime, moshi 0.2.2) the server gets the last 80 ms said only once
    more audio follows (measured: 24 of 25 frames handled, 25 with sphn 0.2), so a conversation that
    stops there is answered one frame fewer; a live one never stops sending.
    """
    frames = -(-len(pcm) // FRAME_SIZE)
    held = 1 if runtime.detect().sphn_api == "0.1" else 0
    return got(samples=(frames - 1 - held) * FRAME_SIZE)


async def converse(url: str, pcm: np.ndarray, *, until: tp.Callable[[ChatResult], bool] = got(),
                   deadline_s: float = ANSWER_S, timeout_s: float = ANSWER_S,
                   on_handshake: tp.Callable[[], None] | None = None,
                   on_audio: tp.Callable[[], None] | None = None, token: str | None = TEST_TOKEN) -> ChatResult:
    """jmoshi's /api/chat client, listening after its last frame until `until(what came back so far)`
    holds or `deadline_s` passed, instead of for a fixed time: a server slower than real time is waited
    for, a fast one is not. What came back is returned either way, for the test's assertions to judge.
    `timeout_s` bounds the connection and the handshake (the server serves one conversation at a time)."""
    return await chat(url, pcm, tail_s=deadline_s, timeout_s=timeout_s, until=until, on_handshake=on_handshake,
                      on_audio=on_audio, token=token)


def converse_sync(url: str, pcm: np.ndarray, **kwargs) -> ChatResult:
    """:func:`converse` run to completion in a new event loop."""
    return asyncio.run(converse(url, pcm, **kwargs))


def http_get(url: str, headers: dict | None = None, timeout: float = 30) -> str:
    """A page of a server the tests started, asked for as a program does (the token as a bearer header)."""
    import urllib.request

    request = urllib.request.Request(url, headers=AUTH if headers is None else headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def japanese(text: str) -> bool:
    return any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in text)


# --- the GPU, the one faked piece ---------------------------------------------------------------------


def fake_gpus(monkeypatch, *gpus: GPU, arch_flags: str = "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120") -> None:
    """The driver's answer (NVML) and what torch says it can run on, whatever this machine has."""
    monkeypatch.setattr(hardware, "nvidia", lambda timeout_s=5.0: Probe(True, NvidiaFacts("550", "12.4", list(gpus))))
    monkeypatch.setattr(hardware, "torch_cuda", lambda timeout_s=60.0: Probe(True, {
        "version": "x", "cuda": "12.8", "available": True, "arch_flags": arch_flags, "arch_list": []}))


# --- a browser's side ---------------------------------------------------------------------------


def opus_chunks(seconds: float) -> list[str]:
    """The test signal as a browser sends it: Opus pages, base64 for a page's script."""
    pcm, opus = speech_like(seconds), OpusStream(SAMPLE_RATE)
    chunks = [opus.encode(pcm[i:i + FRAME_SIZE]) for i in range(0, len(pcm) - FRAME_SIZE + 1, FRAME_SIZE)]
    chunks.append(opus.flush())
    return [base64.b64encode(chunk).decode() for chunk in chunks if chunk]


# The page's own websockets, as the web UI opens them, `count` at once: each sends the audio after the
# handshake, hangs up after three frames of voice (and some text, when `needText`), and tells what it saw.
# Arguments: url, base64 Opus chunks (opus_chunks), count, needText.
PAGE_TALK = """
const [url, chunks, count, needText, done] = arguments;
const talk = () => new Promise((resolve) => {
  const seen = {open: false, handshake: false, audio: 0, text: "", closed: null};
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { seen.open = true; };
  ws.onmessage = (event) => {
    const data = new Uint8Array(event.data);
    if (data[0] === 0) {
      seen.handshake = true;
      for (const chunk of chunks) {
        const raw = Uint8Array.from(atob(chunk), (c) => c.charCodeAt(0));
        const message = new Uint8Array(raw.length + 1);
        message[0] = 1;
        message.set(raw, 1);
        ws.send(message);
      }
    } else if (data[0] === 1) {
      seen.audio += 1;
    } else if (data[0] === 2) {
      seen.text += new TextDecoder().decode(data.slice(1));
    }
    if (seen.audio >= 3 && (seen.text || !needText)) ws.close();
  };
  ws.onclose = (event) => { seen.closed = event.code; resolve(seen); };
});
Promise.all(Array.from({length: count}, talk)).then(done);
"""
