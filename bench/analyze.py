"""How fast `jmoshi analyze` is: one hour of stereo dialogue made from the shared audio, in × real time.

The hour is ../shared/audio's two dialogues (24 and 32 kHz, the latter resampled) one after another,
with random silences between them and the channels swapped every other time, written as a 24 kHz
16-bit stereo WAV as `serve --record` writes it. Then:

- each stage of one file's analysis, timed on its own: decoding, resampling to 16 kHz, Silero VAD
  (batched as jmoshi runs it), events and figures;
- the same VAD run as its own package's ``get_speech_timestamps`` runs it, one window per call and one
  channel at a time (the plain reference), on the first --reference-s seconds;
- `jmoshi analyze FILE --json` end to end in a child process (start-up included).

`--leak-table` instead prints the counts `analyze` gives on the leak tests' scripted dialogue
(tests/builders.py) at the leak levels and delays of issue 23, against the script's, for the shared
recording's two speakers and for two synthetic formant voices.

    .venv/bin/python bench/analyze.py [--minutes 60] [--reference-s 300] [--keep]
    .venv/bin/python bench/analyze.py --leak-table
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jmoshi_cli.analysis import Params, analyze_file, vad
from jmoshi_cli.analysis.events import JMOSHI, USER, find_events
from jmoshi_cli.analysis.leak import Levels
from jmoshi_cli.audio_io import read_audio, resample, write_wav

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "audio"
RATE = 24000
# The leak table's rows: (label, leak dB or None, delay s, reverberation s); issue 23's first, then rooms.
LEAK_ROWS = (("none", None, 0.0, 0.0), ("-40 dB", -40, 0.0, 0.0), ("-30 dB", -30, 0.0, 0.0),
             ("-20 dB", -20, 0.0, 0.0), ("-35 dB, 250 ms late", -35, 0.25, 0.0),
             ("-25 dB, 120 ms late (an echo)", -25, 0.12, 0.0), ("-15 dB", -15, 0.0, 0.0),
             ("-15 dB, 40 ms late, room 0.5 s", -15, 0.04, 0.5), ("-25 dB, 120 ms late, room 0.5 s", -25, 0.12, 0.5),
             ("-20 dB, 250 ms late, room 0.5 s", -20, 0.25, 0.5))


def build(minutes: float, out: Path) -> float:
    """Write the long dialogue to ``out``; returns its length in seconds."""
    pieces = []
    for name in ("daily-5-0276.wav", "prompt-62.wav"):
        audio = read_audio(SHARED / name)
        pieces.append(np.stack([resample(c, audio.sample_rate, RATE) for c in audio.pcm]))
    rng = np.random.default_rng(17)
    parts, samples, n = [], 0, 0
    while samples < minutes * 60 * RATE:
        piece = pieces[n % 2] if n % 4 < 2 else pieces[n % 2][::-1]
        silence = np.zeros((2, int(rng.uniform(0.2, 1.5) * RATE)), dtype=np.float32)
        parts += [piece, silence]
        samples += piece.shape[1] + silence.shape[1]
        n += 1
    pcm = np.concatenate(parts, axis=1)[:, :int(minutes * 60 * RATE)]
    write_wav(out, pcm, RATE)
    return pcm.shape[1] / RATE


def clock(what, *args):
    started = time.perf_counter()
    value = what(*args)
    return value, time.perf_counter() - started


def reference_vad(windows: np.ndarray) -> None:
    """Silero as its own package runs it: one 32 ms window per call, one channel after the other."""
    import torch

    model = vad._model()
    with torch.inference_mode():
        for channel in windows:
            model.reset_states()
            for window in channel:
                model(torch.from_numpy(window[None]), vad.VAD_RATE)


def leak_table() -> None:
    """Issue 23's table, redone on the leak tests' dialogues: each file analysed as `jmoshi analyze` does it."""
    sys.path.insert(0, str(ROOT / "tests"))
    import builders

    sources = [("formant voices (synthetic)", builders.formant_voices)]
    if (SHARED / "daily-5-0276.wav").exists():
        sources.insert(0, ("the shared recording's two speakers", lambda: builders.shared_voices(
            SHARED / "daily-5-0276.wav")))
    with tempfile.TemporaryDirectory(prefix="jmoshi-bench-leak-") as folder:
        for name, voices in sources:
            clean, lines = builders.scripted_dialogue(voices())
            print(f"\n{name}, {clean.shape[1] / builders.DIALOGUE_RATE:.1f} s\n")
            print("| leak | IPUs user / J-Moshi | pauses user / J-Moshi | gaps | overlaps | worst edge | "
                  "measured: J-Moshi in user / user in J-Moshi |")
            print("|---|---|---|---|---|---|---|")
            for label, leak_db, delay_s, reverb_s in LEAK_ROWS:
                path = Path(folder) / "dialogue.wav"
                write_wav(path, builders.with_leak(clean, leak_db, delay_s, reverb_s), builders.DIALOGUE_RATE)
                print(f"| {label} | {_counts(analyze_file(path, Params()).events, lines)} |")
            ipus, pauses = builders.SCRIPT_COUNTS["ipus"], builders.SCRIPT_COUNTS["pauses"]
            print(f"| truth | {ipus[0]} / {ipus[1]} | {pauses[0]} / {pauses[1]} | {builders.SCRIPT_COUNTS['gaps']} | "
                  f"{builders.SCRIPT_COUNTS['overlaps']} | | |")


def _counts(events, lines) -> str:
    """One row: the counts, the farthest IPU edge from where it was placed, the measured leak paths."""
    pauses = [sum(p.speaker == who for p in events.pauses) for who in (USER, JMOSHI)]
    paths = " / ".join(_path(events.leak[who]) for who in (USER, JMOSHI))
    return (f"{len(events.ipus[USER])} / {len(events.ipus[JMOSHI])} | {pauses[0]} / {pauses[1]} | {len(events.gaps)} | "
            f"{len(events.overlaps)} | {_worst_edge(events, lines)} | {paths}")


def _worst_edge(events, lines) -> str:
    found = []
    for channel, who in ((0, USER), (1, JMOSHI)):
        placed = sorted((start, end) for c, start, end in lines if c == channel)
        if len(placed) != len(events.ipus[who]):
            return "-"
        found += [max(abs(span.start * vad.WINDOW_S - start), abs(span.end * vad.WINDOW_S - end))
                  for span, (start, end) in zip(events.ipus[who], placed, strict=True)]
    return f"{max(found):.2f} s"


def _path(path) -> str:
    if path is None:
        return "-"
    if not path.heard or path.delay_s is None:
        return f"not heard (< {path.level_db:.0f} dB)"
    return f"{path.level_db:.1f} dB, {path.delay_s * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--reference-s", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the long WAV (its path is printed)")
    parser.add_argument("--leak-table", action="store_true", help="print the leak table instead (see above)")
    args = parser.parse_args()
    if args.leak_table:
        leak_table()
        return
    import torch

    folder = Path(tempfile.mkdtemp(prefix="jmoshi-bench-analyze-"))
    path = folder / "hour.wav"
    seconds = build(args.minutes, path)
    print(f"{seconds / 60:.1f} min of stereo 24 kHz dialogue, {path.stat().st_size / 1e6:.0f} MB; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    try:
        audio, read_s = clock(read_audio, path)
        pcm16k, resample_s = clock(vad.to_vad_rate, audio.pcm, audio.sample_rate)
        windows = vad.windows_of(pcm16k)
        probs, vad_s = clock(vad.speech_probs, windows)
        levels, levels_s = clock(Levels.of, windows)
        _, events_s = clock(find_events, probs, levels, Params())
        _, whole_s = clock(analyze_file, path, Params())
        part = windows[:, :int(args.reference_s / vad.WINDOW_S)]
        _, reference_s = clock(reference_vad, part)
        reference_rt = part.shape[1] * vad.WINDOW_S / reference_s
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jmoshi_cli", "analyze", str(path), "--json"],
                              capture_output=True, text=True)
        cli_s = time.perf_counter() - started
        rows = [("decode (sphn)", read_s), ("resample to 16 kHz (soxr)", resample_s), ("Silero VAD, batched", vad_s),
                ("levels (windows, 8 ms frames, bands)", levels_s),
                ("events and figures (leak included)", events_s), ("analyze_file, all of it", whole_s),
                (f"`jmoshi analyze --json` (exit {done.returncode}), start-up included", cli_s)]
        for name, took in rows:
            print(f"{name:<62} {took:7.2f} s  {seconds / took:8.0f} x real time")
        print(f"{'Silero VAD alone, one window per call (on ' + str(int(args.reference_s)) + ' s)':<62} "
              f"{part.shape[1] * vad.WINDOW_S / reference_rt:7.2f} s  {reference_rt:8.0f} x real time")
    finally:
        if args.keep:
            print(path)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
