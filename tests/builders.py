"""Test-only builders, kept out of the wheel: LoRA adapters for the tiny model, and a WAV reader.

The adapters are moshi's own LoRA layers (moshi >= 0.2.4: moshi.modules.lora) over the LM as moshi's
loaders build it, saved the way moshi-finetune saves an adapter.
"""

from __future__ import annotations

import json
import os
import typing as tp
import wave
from pathlib import Path

import numpy as np

from jmoshi_cli.fsutil import atomic_write
from jmoshi_cli.tiny_model import CONFIG_NAME, MOSHI_NAME, lm_kwargs_from_config

LORA_NAME = "lora.safetensors"  # moshi-finetune's name
_TINY_LORA_SCALING = 2.0


def build_tiny_lora(base_repo: Path, dest: Path, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA adapter for the tiny model in base_repo, as moshi-finetune writes a checkpoint's consolidated/
    folder: dest/lora.safetensors (the LoRA tensors only) and dest/config.json (the base's config plus
    lora, lora_rank, lora_scaling). Returns the weights' path. Deterministic for a seed."""
    base_repo = Path(base_repo)
    config = json.loads((base_repo / CONFIG_NAME).read_text(encoding="utf-8"))
    return _write_lora(config, base_repo / MOSHI_NAME, Path(dest), rank, seed)


def build_misfit_lora(base_repo: Path, dest: Path, dim: int = 32, rank: int = 4, seed: int = 0) -> Path:
    """Like build_tiny_lora, but trained over a random LM whose ``dim`` differs from base_repo's: an adapter
    that does not fit the tiny model (its config.json says so too)."""
    config = json.loads((Path(base_repo) / CONFIG_NAME).read_text(encoding="utf-8"))
    if config["dim"] == dim:
        raise ValueError(f"dim {dim} is the base's own: the adapter would fit")
    config["dim"] = dim
    return _write_lora(config, None, Path(dest), rank, seed)


def _write_lora(config: dict[str, tp.Any], base_weight: Path | None, dest: Path, rank: int, seed: int) -> Path:
    """moshi's own LoRA layers over the LM as moshi's loaders build it, saved the way moshi-finetune saves
    an adapter (bf16, the state-dict names get_lora_moshi loads)."""
    import torch
    from moshi.models import loaders
    from moshi.modules.lora import replace_all_linear_with_lora
    from safetensors.torch import save

    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        lm = loaders.get_moshi_lm(base_weight, lm_kwargs=lm_kwargs_from_config(config), device="cpu",
                                  dtype=torch.float32)
        replace_all_linear_with_lora(lm, rank, _TINY_LORA_SCALING)
        for name, param in lm.named_parameters():
            if name.endswith(".lora_B.weight"):
                param.normal_(std=0.05)  # fine-tuning starts it at zero; a zero adapter would change nothing
        tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in lm.state_dict().items()
                   if ".lora_A." in name or ".lora_B." in name}
        del lm
    atomic_write(dest / LORA_NAME, save(tensors))
    adapter_config = {**config, "lora": True, "lora_rank": rank, "lora_scaling": _TINY_LORA_SCALING}
    atomic_write(dest / CONFIG_NAME, json.dumps(adapter_config, indent=4).encode())
    return dest / LORA_NAME


def read_wav_pcm16(path: Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV written by :func:`write_wav`: ((channels, samples) float32, rate)."""
    with wave.open(str(path), "rb") as w:
        ch, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        if width != 2:
            raise ValueError(f"{path}: {8 * width}-bit WAV, expected 16-bit")
        raw = np.frombuffer(w.readframes(frames), dtype="<i2")
    return (raw.reshape(-1, ch).T.astype(np.float32) / 32767.0), rate


# Two-speaker dialogues with known events, each voice leaking into the other's channel: the leak tests of
# `jmoshi analyze` (tests/test_analyze_leak.py) and its table (bench/analyze.py --leak-table).

DIALOGUE_RATE = 24000
NOISE_DB = -62.0  # light noise on both channels, as a quiet room and a microphone give
REVERB_S = 0.5  # the simple room's reverberation time (60 dB decay)
LEAD_S = 0.1  # of sound kept before each utterance's IPU
# Utterances of the shared dialogue (channel, start s, end s): the left speaker stands for the user, the
# right one for J-Moshi. The long one (4.3 s) goes on at an even level from 2 s in, where the script puts
# the backchannel: its soft stretch before that, under a strong leak of the backchannel, would be lost
# (the limit analyze states: a voice as quiet as the other's leak).
SHARED_USER = ((0, 3.58, 4.77), (0, 14.05, 16.45), (0, 19.3, 20.26), (0, 17.28, 19.04), (0, 9.6, 12.38),
               (0, 3.58, 4.77))
SHARED_JMOSHI = ((1, 1.5, 3.07), (1, 12.74, 13.89), (1, 4.77, 9.06), (1, 16.64, 17.7), (1, 20.42, 23.07),
                 (1, 1.5, 3.07))
# Who speaks which of their utterances when: (channel, utterance, line it follows (index), its "start" or
# "end", seconds after that). 6 IPUs each, the user pausing once and J-Moshi twice, 5 gaps, and 3 overlaps:
# a backchannel inside J-Moshi's long turn, the user taking the floor before J-Moshi stops, J-Moshi
# taking it back the same way.
SCRIPT = ((1, 0, None, "start", 0.5), (1, 1, 0, "end", 0.5), (0, 0, 1, "end", 0.5), (0, 1, 2, "end", 0.45),
          (1, 2, 3, "end", 0.35), (0, 2, 4, "start", 2.1), (0, 3, 4, "end", -0.5), (1, 3, 6, "end", 0.4),
          (0, 4, 7, "end", 0.5), (1, 4, 8, "end", -0.5), (1, 5, 9, "end", 0.5), (0, 5, 10, "end", 0.5))
SCRIPT_COUNTS = {"ipus": (6, 6), "pauses": (1, 2), "gaps": 5, "overlaps": 3}  # (user, J-Moshi)
VOWELS = ((800, 1200, 2500), (300, 2300, 3000), (350, 1300, 2400), (500, 1900, 2600), (500, 900, 2500))
FORMANT_WIDTHS = (80, 90, 120)


def shared_voices(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The user's and J-Moshi's utterances (SHARED_USER, SHARED_JMOSHI) cut from the shared dialogue."""
    from jmoshi_cli.audio_io import read_audio, resample

    audio = read_audio(path)
    pcm = np.stack([resample(c, audio.sample_rate, DIALOGUE_RATE) for c in audio.pcm])

    cut = trimmed([pcm[channel, int((start - LEAD_S) * DIALOGUE_RATE):int(end * DIALOGUE_RATE)]
                   for channel, start, end in (*SHARED_USER, *SHARED_JMOSHI)])
    return cut[:len(SHARED_USER)], cut[len(SHARED_USER):]


def formant_voices(seed: int = 5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A higher and a lower synthetic voice (:func:`formant_speech`), utterances as long as the shared ones."""
    rng = np.random.default_rng(seed)
    user = [formant_speech(s, 215.0, 1.17, rng) for s in (1.1, 2.3, 0.8, 1.7, 3.2, 1.1)]
    jmoshi = [formant_speech(s, 115.0, 1.0, rng) for s in (1.5, 1.1, 4.2, 1.0, 2.6, 1.5)]
    cut = trimmed(user + jmoshi)
    return cut[:len(user)], cut[len(user):]


def formant_speech(seconds: float, pitch_hz: float, formant_scale: float, rng: np.random.Generator) -> np.ndarray:
    """Speech-like sound that Silero takes for speech: syllables of 130-240 ms, each a noise burst (the
    consonant) then a vowel, the harmonics of a gliding, declining pitch shaped by the vowel's three formant
    resonances; the last 100 ms fade by 35 dB. At -25 dBFS while it sounds."""
    control = 200  # Hz: the rate at which pitch, formants and loudness are set
    times = np.arange(int(np.ceil(seconds * control)) + 1) / control
    formants, gain, hiss = _syllables(seconds, times, formant_scale, rng)
    edge = np.clip(times / 0.03, 0, 1) * np.where(times > seconds - 0.1, 10 ** (-35 * (times - seconds + 0.1) / 2),
                                                   1.0)
    gain, hiss = gain * edge, hiss * edge
    pitch = pitch_hz * (1.1 - 0.2 * times / seconds) * (1 + 0.06 * np.sin(2 * np.pi * 0.7 * times + rng.uniform(0, 6)))
    t = np.arange(int(seconds * DIALOGUE_RATE)) / DIALOGUE_RATE
    phase = 2 * np.pi * np.cumsum(np.interp(t, times, pitch) * (1 + 0.005 * rng.standard_normal(len(t))))
    phase /= DIALOGUE_RATE
    voiced = np.zeros(len(t))
    for harmonic in range(1, int(7200 / pitch_hz)):
        freq = harmonic * pitch
        amp = gain * (freq < 7000) / harmonic
        for centre, width in zip(formants, FORMANT_WIDTHS, strict=True):
            amp = amp * centre ** 2 / np.sqrt((centre ** 2 - freq ** 2) ** 2 + (width * freq) ** 2)
        voiced += np.interp(t, times, amp) * np.sin(harmonic * phase)
    spectrum = np.fft.rfft(rng.standard_normal(len(t)))
    freqs = np.fft.rfftfreq(len(t), 1 / DIALOGUE_RATE)
    noise = np.fft.irfft(spectrum * ((freqs > 2500) & (freqs < 8000)), len(t))
    out = voiced + np.interp(t, times, hiss) * noise / noise.std() * np.abs(voiced).max() * 0.3
    return (out / np.sqrt(np.mean(out[out != 0] ** 2)) * 10 ** (-25 / 20)).astype(np.float32)


def _syllables(seconds: float, times: np.ndarray, scale: float, rng: np.random.Generator):
    """Formant tracks (3, len(times)), vowel loudness and consonant hiss at each control point."""
    bounds = [0.0]
    while bounds[-1] < seconds:
        bounds.append(bounds[-1] + rng.uniform(0.13, 0.24))
    bounds[-1] = seconds
    formants, gain, hiss = np.zeros((3, len(times))), np.zeros(len(times)), np.zeros(len(times))
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        inside = (times >= start) & (times < end)
        formants[:, inside] = np.array(VOWELS[rng.integers(len(VOWELS))])[:, None] * scale
        x = (times[inside] - start) / (end - start)
        consonant = rng.uniform(0.15, 0.35)
        gain[inside] = (np.clip((x - consonant) / 0.15, 0, 1) * np.clip((1 - x) / 0.25, 0, 1)
                        * 10 ** (rng.uniform(-4, 2) / 20))
        hiss[inside] = (x < consonant) * 0.15 * rng.uniform(0.3, 1)
    smooth = np.ones(9) / 9  # 40 ms glides between vowels
    formants = np.stack([np.convolve(np.pad(f, 4, mode="edge"), smooth, "valid") for f in formants])
    gain = np.convolve(np.pad(gain, 2, mode="edge"), np.ones(5) / 5, "valid")
    return formants, gain, hiss


def events_of_each(dialogues: list[np.ndarray], params=None) -> list:
    """Each stereo dialogue's events as find_in_audio finds them, the VAD run once for all of them (its batch
    rows are independent: the same scores as one file at a time); shorter ones padded with silent windows that
    are left out of their own events."""
    from jmoshi_cli.analysis import Params, vad
    from jmoshi_cli.analysis.events import find_events
    from jmoshi_cli.analysis.leak import Levels

    windows = [vad.windows_of(vad.to_vad_rate(d, DIALOGUE_RATE)) for d in dialogues]
    longest = max(w.shape[1] for w in windows)
    probs = vad.speech_probs(np.concatenate([np.pad(w, ((0, 0), (0, longest - w.shape[1]), (0, 0)))
                                             for w in windows]))
    return [find_events(probs[2 * i:2 * i + 2, :own.shape[1]], Levels.of(own), params or Params())
            for i, own in enumerate(windows)]


def trimmed(pieces: list[np.ndarray]) -> list[np.ndarray]:
    """Each utterance cut to where `jmoshi analyze` finds it when it is heard alone (with the light noise),
    with LEAD_S of what came before (Silero needs the start of a sound to hear its onset where it did): its
    IPU is then found from LEAD_S into it to its end."""
    from jmoshi_cli.analysis.vad import WINDOW_S

    pad = np.zeros(int(0.5 * DIALOGUE_RATE), dtype=np.float32)
    alone = [np.concatenate([pad, piece, pad, pad]) for piece in pieces]
    events = events_of_each([with_leak(np.stack([a, np.zeros_like(a)]), None, 0.0, 0.0, seed=99) for a in alone])
    out = []
    for sound, found in zip(alone, (e.ipus["user"] for e in events), strict=True):
        if len(found) != 1:
            raise ValueError(f"an utterance must be one IPU alone, found {len(found)}")
        start, end = (round(w * WINDOW_S * DIALOGUE_RATE) for w in (found[0].start, found[0].end))
        out.append(sound[start - round(LEAD_S * DIALOGUE_RATE):end])
    return out


def scripted_dialogue(voices: tuple[list[np.ndarray], list[np.ndarray]]
                      ) -> tuple[np.ndarray, list[tuple[int, float, float]]]:
    """The SCRIPT spoken by ``voices`` (user's, J-Moshi's utterances, as :func:`trimmed` cuts them): stereo
    (user, J-Moshi) at DIALOGUE_RATE without noise or leak, and each line's IPU (channel, start s, end s)."""
    lines: list[tuple[int, float, float]] = []
    for channel, utterance, after, edge, offset in SCRIPT:
        length = len(voices[channel][utterance]) / DIALOGUE_RATE - LEAD_S
        start = offset if after is None else lines[after][1 if edge == "start" else 2] + offset
        lines.append((channel, start, start + length))
    out = np.zeros((2, int((max(end for _, _, end in lines) + 1.0) * DIALOGUE_RATE)), dtype=np.float32)
    for (channel, utterance, *_), (_, start, _) in zip(SCRIPT, lines, strict=True):
        piece = voices[channel][utterance]
        at = round((start - LEAD_S) * DIALOGUE_RATE)
        out[channel, at:at + len(piece)] += piece
    return out, lines


def with_leak(clean: np.ndarray, leak_db: float | None, delay_s: float, reverb_s: float, seed: int = 0,
              directions: tuple[int, ...] = (0, 1)) -> np.ndarray:
    """Each voice of ``clean`` (2, samples) also heard ``leak_db`` down on the other channel (None: not at
    all), ``delay_s`` late, through a room of ``reverb_s`` reverberation time (0: none), into the channels
    in ``directions``; and light noise on both."""
    rng = np.random.default_rng(seed)
    out = clean.astype(np.float64)
    for into in directions if leak_db is not None else ():
        out[into] += _convolved(clean[1 - into], _room(delay_s, reverb_s, rng) * 10 ** (leak_db / 20))
    out += 10 ** (NOISE_DB / 20) * rng.standard_normal(out.shape)
    return out.astype(np.float32)


def _convolved(signal: np.ndarray, response: np.ndarray) -> np.ndarray:
    """``signal`` through ``response``, as long as ``signal``: overlap-add of FFT blocks a few times the
    response's length, several times faster than one FFT of the whole dialogue for a short room."""
    n, length = len(signal), len(response)
    block = 1 << max(12, (4 * length).bit_length())
    step = block - length + 1
    count = -(-n // step)
    padded = np.zeros(count * step)
    padded[:n] = signal
    pieces = np.fft.irfft(np.fft.rfft(padded.reshape(count, step), block, axis=1) * np.fft.rfft(response, block),
                          block, axis=1)
    out = np.zeros(count * step + block)
    for i, piece in enumerate(pieces):
        out[i * step:i * step + block] += piece
    return out[:n]


def _room(delay_s: float, reverb_s: float, rng: np.random.Generator) -> np.ndarray:
    """Impulse response of unit energy: the sound ``delay_s`` late, then, with a reverberation time, a tail of
    noise decaying 60 dB over it, 4 dB below the direct sound in all."""
    delay = round(delay_s * DIALOGUE_RATE)
    tail = np.zeros(0)
    if reverb_s > 0:
        t = np.arange(int(reverb_s * DIALOGUE_RATE)) / DIALOGUE_RATE
        tail = rng.standard_normal(len(t)) * 10 ** (-3 * t / reverb_s)
        tail[:int(0.003 * DIALOGUE_RATE)] = 0.0  # the first reflection 3 ms after the direct sound
        tail *= 10 ** (-4 / 20) / np.sqrt(np.sum(tail ** 2))
    out = np.zeros(delay + max(1, len(tail)))
    out[delay:delay + len(tail)] += tail
    out[delay] += 1.0
    return out / np.sqrt(np.sum(out ** 2))


def flip_a_byte(path: Path, keep_mtime: bool = False) -> None:
    """One byte in the middle of `path` changed in place, its size kept. Its mtime moves on as any later write
    moves it (a write within the clock tick of the file's own leaves it as it was), or is put back, as a tool
    that restores times does and as a byte rotting on the disk leaves it."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)[0]
        f.seek(before.st_size // 2)
        f.write(bytes([byte ^ 0xFF]))
    mtime = before.st_mtime_ns if keep_mtime else before.st_mtime_ns + 10**9
    os.utime(path, ns=(before.st_atime_ns, mtime))
    assert path.stat().st_size == before.st_size
