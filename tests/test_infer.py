"""`jmoshi infer`'s library on CPU with the tiny random model (real moshi loaders, Mimi, LMGen)."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from jmoshi_cli import audio_io
from jmoshi_cli.audio_io import FRAME_SIZE, SAMPLE_RATE
from jmoshi_cli.cache.artifacts import ModelFiles
from jmoshi_cli.errors import CacheError, PreflightError, UsageError
from jmoshi_cli.infer import InferOptions, InferRequest, Session, run, summarize
from jmoshi_cli.infer.inputs import collect_inputs, expected_frames, output_names, prepare_out_dir
from jmoshi_cli.sampling import Sampling
from jmoshi_cli.transcript import join_pieces

from builders import read_wav_pcm16

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"
PROMPT = SHARED_AUDIO / "prompt-62.wav"
SEED = 1234


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


def _model_files(folder: Path, config: Path | None = None) -> ModelFiles:
    return ModelFiles(
        moshi_weight=folder / "model.safetensors",
        mimi_weight=folder / "tokenizer-e351c8d8-checkpoint125.safetensors",
        tokenizer=folder / "tokenizer_spm_32k_3.model",
        config=config if config is not None else folder / "config.json",
    )


@pytest.fixture(scope="module")
def tiny_files() -> ModelFiles:
    from jmoshi_cli.tiny_model import cached_tiny_repo

    return _model_files(cached_tiny_repo())


@pytest.fixture(scope="module")
def session(tiny_files) -> Session:
    return Session.load(tiny_files, InferOptions(device="cpu", sampling=Sampling(seed=SEED)))


def with_options(session: Session, seed: int | None = None, **changes) -> Session:
    """The same loaded model with other per-file options (channel, seed)."""
    if seed is not None:
        changes["sampling"] = replace(session.options.sampling, seed=seed)
    return Session(session.model, replace(session.options, **changes))


@pytest.fixture(scope="module")
def prompt() -> audio_io.Audio:
    if not PROMPT.is_file():
        pytest.skip(f"shared audio not found at {PROMPT} (the repository's ../shared/audio)")
    return audio_io.read_audio(PROMPT)


# 0.1 s of stereo at 8 kHz (440 Hz at 0.3 on the left, 660 Hz at 0.5 on the right), encoded by
# libsndfile 1.2.2 as FLAC, MP3 and Ogg Vorbis; zlib + base64.
ENCODED = {
    "flac": (
        "eNoBNwTI+2ZMYUMAAAAiEAAQAAAD4QAD4QH0AvAAAAMgsFlwwSVNCTtbUMSM7MW26oQAACggAAAAcmVmZXJlbmNlIGxpYkZMQUMg"
        "MS40LjMgMjAyMzA2MjMAAAAA//h0GAADH5BIAAANAhh6IQ0luLSvVXx1IgNzOAKSe82tIQiBJC4/b0kIggoFJPbO5CEQhChOg9/I"
        "RCIESWjcP6QSEEJS3tuoRCIIUVN46ZIIiEIqnmaGqEQhBIlN7bTEkBEIiU94+ighIERJR7NyiEQhCST3m1pCEQJIXH7ekhEEFApJ"
        "7Z3IQiEIUJ0Hv5CIRAiS0bh/SCQghKW9t1CIRBCipvHTJBEQhFU8zQ1QiEIJEpvbaYkgIhESnvH0UEJAiJKPZuUQiEISSe82tIQi"
        "BJC4/b0kIggoFJPbO5CEQhChOg9/IRCIESWjcP6QSEEJS3tuoRCIIUVN46ZIIiEIqnmaGqEQhBIlN7bTEkBEIiU94+ighIERJR7N"
        "yiEQhCST3m1pCEQJIXH7ekhEEFApJ7Z3IQiEIUJ0Hv5CIRAiS0bh/SCQghKW9t1CIRBCipvHTJBEQhFU8zQ1QiEIJEpvbaYkgIhE"
        "SnvH0UEJAiJKPZuUSYAAA/bG4sf/xwKkLiBAdpXLp6BAGhFJ2cDVARNsuz2yxIkU5FF8i2jRQkUcWii++6nRAgUILQ6yVdRgg8UK"
        "LS2yRfXj54kSY59l0mvDDRgotzK5MivOzhIsx6q5N1vNnCRJ7k0yL7e5MEijik0SLr/aMPFnkoJvukUbJOGnkqbIkX+xQeLFFJdZ"
        "JkUZpNEiy1stvk068cKFlOXZIkVb4aLEHsXVIk1e8WJGGvXTdKs90s8acQmm++RzRQkUeUii+RZTooSJEFo9dIupyQcMEFJdbIkU"
        "4ecKEmqbbffVyk4QLNSquVIp540WKNWmy+TV3hosQe5Nl99vNlihJ70FXyLKNlChAkhFVsm3+SxIgUUn9ku3+PihQkhTrZMijBBw"
        "sUUt9d8mnPjxIstjLJEmjnThQoxqq5N1uumChZhDab5VfeliBhxC6bZdntliRIpyKL5FtGihIo4tFF991OiBAoQWh1kq6jBB4oUW"
        "ltki+vHzxIkxz7LpNeGGjBRbmVyZFednCRZj1VybrebOEiT3JpkX29yYJFHFJokXX+0YeLPJQTfdIo2ScNPJU2RIv9ig8WKKS6yT"
        "IozSaJFlrZbfJp144ULKcuyRIq3w0WIPYuqRJq94sSMNeum6VZ7pZ404hNN98jmihIo8pFF8iynRQkSILR66RdTkg4YIKS62RIpw"
        "84UJNU22++rlJwgWalVcqRTzxosUatNl8mrvDRYg9ybL77ebLFCT3oKvkWUbKFCBJCKrZNv8liRAopP7Jdv8fFChJCnWyZFGCDhY"
        "opb675NOfHiRZbGWSJNHOnChRjVVybrddMFCzCG03yq+wN+Daw3UeA=="
    ),
    "mp3": (
        "eNq9lXs01GkYx9+5Gozm5zKMS86Q+5k00xCKGjEZt9NgUlk5k0vRluRWVmUYMsacjGuIDOHQjaLsUoxLLpHYrM2y2zCozpYotUrb"
        "b8du9cee9c/+0eec932e8/zxPs/z/eP7wnJWKPg3eyIiDyoCQXHQACixgc8qnFuNxdWAV0PRy9HL2ZtJt6ZRqWiLz6PY4kxQkvUA"
        "MbAyR2LL7d3g6wLLT4QCaCmCu60SgKqo0WvwToBA9EWO81AtLS1tLIEgf27u5enzmencCf3MNlgisUFE6QASQhqofwGWot7ASwR4"
        "vifpadKHKClBBk7ABDyIB4jJj4YkIANgXoF0pdF/Jos8AJCozs7HEqCU+MHRiawo8+bnF94DoP7R0OnCAEBON0UCrSpLD98yuA3u"
        "eXfno+2zAnpJae6N+LiG36UnXpnUvvb6Bj1kiyRZY9qdNT84KrRuf7ykBC9SHywh4D/xdHi13lguMFRAWil8TsiOjl/GgEcVETE5"
        "OflMEfEEAmHbPKDDtmoyTwBKVWXXGFQLFQ6Pa6Gszy5OLo8yOlX/6x3tPClj6HucVPb80ty5hBlOp3wdwDxAF9PH/Dxk8zWMDvPW"
        "2VDK5Xm82J69kT2dMpkylG5xy6HSptGb2O/ti8yGOFvV7+lQrwrCZ8VTY0SznTqirB+da2zC3CsoDKEJR1ikk1HpE5rPjNs0Hh0a"
        "42ZTyRRczyAaVzOn/oDhdxlE6yKdzN5z3pwcTzeFFGPu5sy9Qj8TH7PtZw32SSEAOFVPFpPaYXm4610d5Xw/0SBL3JRoVaebVe9+"
        "2lDSan4xL1YwP1sdIpsxNV+I3OCCvpAT2NOlMXG6YNg0LXzo6KEeLXGYhGqI4UnFYSg1Lg4wwAyQVWO1QL3uRJT0qIEtBp2hge1m"
        "ZO9C6epD+BCRTBs1la0hkLCinqw55iosMhNSckrpZ0Q5+KkZs3T7mE9rlQecdWcna7r11maU24QPhg/yN6P7iGRTYwpTxKqN7b0d"
        "5FfRHOBUio3VHSsVeVY9NF5ICBv5e9G38QcPjH9rafL0Ms0jVGhmxLGzVbvvEmPly8MBMc4lbkcjywQt5WPSpS6xlrTrlfc6GjDn"
        "8Sdjwnxv5t3LLU2UksXKmYhqZXOS5FIod+DUxpx3XB+DdjL9+JiIDdGaH/30s6bs8GDeC9UzyeQKHpWMHDcOXhTQBdCEzLjrQFlh"
        "Q6rLAG2kNlp3mU9J4UhvqSzs11Bv3C8U37+B23qwrDAXU7dRyDDOnvNLUwu0lncP+1q5Zcdb96rH0zMQhQEIKIVuknqT1RqiWvXK"
        "sDB5+fHLpDY4WC36WMmWAr1phwRYLnDtMxu+wxQNhkMcze+ydItl5GsuJWwjyM/AuxSHLCy/zq2n4w1LLPAdiH8sJ920bM2epeie"
        "bsrJ4DcqJAl2c0bNMqg4FNtsqXJzn1baJ2d63lDU71CiuGiDuQmPxk0jLFV+a8y7e3ggjRa0Y7ukrhPB3r3Au+KLIyvE5CnR4vn7"
        "pSOQds5Ry5yA8DS+v67pCyv/1iKfyOG1b5B8G+cBVT514iEm/0r1Ls2gl3vjHj7vGbDxuS+m73zmkt+sRkRny8hFQGv0uFxISEFh"
        "tzudWa92scIu3vGJqqYrrZ9DRqZ17UCoaqL6O6owlf5YUu1aN6MS0siVYEhZpGJGgJC8A9raPGfW26t18pBTEetunFcdJqr7NHox"
        "0cnEdZCYxPXHoMhjfH7YqEcMGs3ps/PCKRddTvvldkvWpha9aTl0nEJPj34dmG5f38HTRKMCK94XQqrWGyx5wGbmBeXB37IsBwqP"
        "TRQk/uDQFB1j96pLD4fgJW/AkbFrQBPEQDdTUhtqpho9t3wSscQh0T76bdSsQz+tidI90RDM0DpChYhkdjGXrJcqMZEyiIVBfgD4"
        "lycwGERBEJuK/fIbXPoKwHJS6BGFm1WumDIAKBZC4YP/452/ADFTMWQ="
    ),
    "ogg": (
        "eNrtVn1QU1cWPwlfj/DRBwYmoNgESZuXTTShWA3F3RCJkIeR+GIQ4jCDhggByochjmydbqjBQWQcS5MsZW1moSQjWZe1tnQWdtYi"
        "C7ErEvlm2K8BW0FEZzrL7s7u9A/3viTS/rd/tPtf79x37zv3/O45955z7rm3qLJSC0wIlay0o0V0f+vjkzmMnYyz9WdOmcz0AFP+"
        "chAhuRLs32cU0TPh2zMZqP/j9CFVrP75VikLCwrJQrwSU0PV7qIzldxa06niwChXxc2UZEok+yRZXAFlrLAYTHWVXGXdWdOZ+ro3"
        "jXVNBC0zEX3KIweL8pTUATTVXFdx2lRrZEQEJScoDhYjFANiKTaPn6IlDZiDooiINIPmRH6aYU52iFeBa9tUKe63ioSOEvLzBKqE"
        "UKZpD2tVDsqJ/gxsbQFPuyA19pjZhRdV0fxa9UBTcuHj9w1O6aE0g19PfmBYkCIcRal6zJzs0/wKdvah8cenzkuyHb0Kwe27f6PW"
        "xa3tJ9p/v5iq3RDbOIWmO9hJ87PB+b+Q1eMcQ4fUN/5QK3hn6qqOXifIwxmBNbMARjWxyqNWmiGPBCuwlY3su4078jszJpgBiBxo"
        "5wiurAg6d6k6K0qdxlKnp9l5fci75+uB3RsDz54Mx9su3giHzwE4/J2WeIWpowAnVvs4BhuuwOJalEnmKT02YNaQ9/ESP/dRn6Jc"
        "VoFf6GiJSlLck0WlW0gikv/bYoVvB556SwHYJEgKErmmVFRDni1wRVa5MFRDdOcqo/sxXeG7F27zzuVL6aiG6Kpe7Jwrus0THaK7"
        "BUwXwew1Mf8/upCic73f0oUUuda/j339UH4o/6Og44Q1oO8mzoorTYCxaNiPzj3ASOOOCRTudxtFMQCiiRmUOG+KCme/s75wgNj9"
        "qOvSRCKF0ZDHAE6schacETdFVg8jK265GabDul4BHECzDICXX/CMPYRWOrn0orntDwucj5q/ylFvU55zeS6l581u5iV41pt7sfl/"
        "5MzavD91mUYtyumsFkG3B8DKjELpbHsWPzlKkFXBBzwRyjVs1d9zHmxTzh7T6VrXml2C9l6T17sxuplTxEYTdfMWXrurstvT7x3Y"
        "GMaVD15TI+SipazLg0TSyHuZh7Vs9SyNNKZ4he0eU7f3yfCt2LzpLLVWV3bcSev2Dg8gIE5rOW4pK41E4mjQjyZgHklzGEsjr3s3"
        "hgdEE6/LdWWLFuOSk4HU3RJNfBo3YkHZ9c0TyActYSC3JjR1HjUmvN7dsMJAe1ACHoFy7If2U2SKL8OWqBjrsmkU1/vs6K5JsiWS"
        "Qvc7GkVBTwVFkf12loLgt2pyBW47jpL8G8jPbwT8HA1fMgC3ccfQpaCKTjHcl61xbR3S1WtmivRxzH4ZwTd0yNau2WdQYz5Crl9D"
        "Y6+6m/yIfI8KkCoiQCK92QjCBCtrB7ojatlL18ozrk9ddYBcCNY7jaIJ2qxq7XsZ6k1kdLVuPkM1GxjRNbvWLvUK2j3egDeOZql1"
        "j4ZpusrrJc8qA5CyJHoAOSJmlk1bcrFV9AtkWe/T0U/V2r3I/i0bAX80lM036ZaSAFwoYo6V/+EJ9qrS0BKImUwU2wqcInl9dkUB"
        "0XqVYvFQZg2LRzfgK/YWdLkxoR+FJY8iCbedSnejDaG/Y/dVNEl+z40C6wH5U1aU9QNse3H+fiI1RhSISrQazgXcgFPVYh+L5+ba"
        "Z/SXh4oxaWSPfUF/Q1p1X0YQg8hXuQa/SkX4ODVxQrSTGrGv29Agttn1l6W+P13AvYPJhhtDqztsDWI3p2ZyL/KpX7rQXeM/EMVr"
        "uoL+zP4DGO/85OCq3uzPxXi1z/Yi18Ur0NiD3LXUpq9ysRXzJHJxDEiaG8BK3my86Oj7eHR6OWCmIQbYpCQdJFNosg0tlg4cjBfY"
        "W58909cVZFCkqt/ipyNKQ2+6k7rXRavroXF89xzNwBUBk5D9gXXYAsaZo7C0FwwCtdlRIQZFFYpbcYXAHVKEPBhikKZ+N/sFwz5D"
        "ty+MTbidVGGI0UnS7ZYX7PpqwrGFG5yjD0pIUTUxaNcT/S8UfSPPJEaMmtC0OX01IilhUB7AL8PoJLNLKB478tpADjOfnXlYjmKM"
        "C9yRcJzDFXBauXIOI3ifM6wvgbUPsLa20/5l4OWebOm5s8JIR5kWl2/lyOCbNpwb9s2bln55ONzJ4giZSJgt7pzUlP518y3HQTYG"
        "DUkBkHVzaB988a/1aOjK/rGzQdT58u5Ln9iPPH1XyLL2VWP76l/KLWOxuqc0/6xIvW3PZzNgIPiaWT4PI//+FYB9NHxp87PpZwDU"
        "4kfjyXuYCGsxpt7+clc7wPHg6pfXQPJcCLidOfN2/IcMoDaurNzdDk6/pnRp2/nxHuMWcv/XX4Dk9t56Bv5r2ZPxY5ePG1L9lY+q"
        "F2X1u1lADK75zx3GtBo406Yrc++pKvnZQvnKnyciRtZ/8/b600/Qvq/+POWjifx82XPf73aB5LP/rP3EFvNfmDI17A=="
    ),
}


def encoded_file(folder: Path, ext: str) -> Path:
    import base64
    import zlib

    path = folder / f"tone.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zlib.decompress(base64.b64decode("".join(ENCODED[ext]))))
    return path


def write_clip(path: Path, pcm: np.ndarray, sample_rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    audio_io.write_wav(path, pcm, sample_rate)
    return path


def synthetic(seconds: float, sample_rate: int = 24000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Speech-band noise bursts with a different signal on each channel."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    chans = []
    for c in range(channels):
        env = (np.sin(2 * np.pi * (1.3 + c) * t) > 0).astype(np.float32)
        chans.append((0.2 * env * rng.standard_normal(n) + 0.1 * np.sin(2 * np.pi * (220 * (c + 1)) * t))
                     .astype(np.float32))
    return np.stack(chans)


def wav_info(path: Path) -> tuple[int, int, int]:
    with wave.open(str(path), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getnframes()


def check_outputs(result, samples: int, sample_rate: int) -> None:
    """Lengths, rates, channels, alignment and transcript of one good result."""
    assert result.ok, result.error
    frames = expected_frames(samples, sample_rate)
    assert result.frames == frames
    assert frames == math.ceil(math.ceil(samples * SAMPLE_RATE / sample_rate) / FRAME_SIZE)
    length = frames * FRAME_SIZE
    assert wav_info(result.outputs["jmoshi"]) == (SAMPLE_RATE, 1, length)
    assert wav_info(result.outputs["dialogue"]) == (SAMPLE_RATE, 2, length)
    mono, _ = read_wav_pcm16(result.outputs["jmoshi"])
    dialogue, _ = read_wav_pcm16(result.outputs["dialogue"])
    # J-Moshi on the right, sample for sample the mono file; the user on the left.
    np.testing.assert_array_equal(dialogue[1], mono[0])
    assert np.abs(mono).max() > 0  # the random model does make sound
    transcript = json.loads(result.outputs["transcript"].read_text(encoding="utf-8"))
    assert transcript["frames"] == frames and transcript["sample_rate"] == SAMPLE_RATE
    frames_seen = [p["frame"] for p in transcript["pieces"]]
    times = [p["time_s"] for p in transcript["pieces"]]
    assert frames_seen == sorted(frames_seen) and len(set(frames_seen)) == len(frames_seen)
    assert all(0 <= t < samples / sample_rate for t in times)
    assert all(abs(p["time_s"] - p["frame"] * 0.08) < 1e-9 for p in transcript["pieces"])
    assert transcript["text"] == join_pieces(p["piece"] for p in transcript["pieces"])
    assert transcript["text"] == result.text
    assert "\u2581" not in transcript["text"]


# --------------------------------------------------------------------------------------------
# pure helpers: joining, naming, inputs, audio
# --------------------------------------------------------------------------------------------


def test_output_names_avoid_collisions(tmp_path):
    a, b = tmp_path / "day1" / "talk.wav", tmp_path / "day2" / "talk.wav"
    c, d = tmp_path / "x" / "clip.wav", tmp_path / "x" / "clip.flac"
    e = tmp_path / "solo.mp3"
    names = output_names([a, b, c, d, e])
    assert names == {a: "day1__talk", b: "day2__talk", c: "clip.wav", d: "clip.flac", e: "solo"}
    f = tmp_path / "day1__talk.wav"  # a literal name equal to a made-up one
    names = output_names([a, b, f])
    assert len({n.lower() for n in names.values()}) == 3


def test_collect_inputs(tmp_path):
    root = tmp_path / "in"
    for rel in ("b/2.wav", "a/1.FLAC", "a/notes.txt", ".hidden/3.wav", "a/.4.wav", "c.mp3",
                "old.jmoshi.wav", "old.dialogue.wav", "d/5.ogg", "d/6.opus"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    explicit = tmp_path / "explicit.txt"
    explicit.write_text("not audio, but asked for")
    found = collect_inputs([root, explicit, root / "c.mp3"])
    rel = [str(p.relative_to(tmp_path)) for p in found]
    assert rel == ["in/a/1.FLAC", "in/b/2.wav", "in/c.mp3", "in/d/5.ogg", "in/d/6.opus", "explicit.txt"]


def test_collect_inputs_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no audio here")
    with pytest.raises(UsageError, match="no audio files") as err:
        collect_inputs([empty])
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="no such file"):
        collect_inputs([tmp_path / "missing.wav"])
    with pytest.raises(UsageError):
        collect_inputs([])
    good = tmp_path / "good.wav"
    good.write_bytes(b"x")
    warnings: list[str] = []
    assert collect_inputs([empty, good], on_warning=warnings.append) == [good]
    assert warnings == [f"no audio files in {empty}"]


def test_out_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="cannot create the output folder"):
        prepare_out_dir(blocker / "out")
    with pytest.raises(UsageError, match="cannot create the output folder"):
        prepare_out_dir(blocker)
    assert prepare_out_dir(tmp_path / "new" / "out").is_dir()


def test_run_checks_inputs_and_out_dir_before_loading(tmp_path):
    """Before the catalogue is read (the variant does not exist) or any model is looked for."""
    clip = write_clip(tmp_path / "clip.wav", synthetic(0.2)[0], 24000)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="output folder"):
        run(InferRequest([clip], blocker / "out", variant="no-such-variant", options=InferOptions(device="cpu")))
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(UsageError, match="no audio files"):
        run(InferRequest([empty], tmp_path / "out", variant="no-such-variant", options=InferOptions(device="cpu")))


@pytest.mark.slow
def test_model_problems_raise_before_any_file(tiny_files, tmp_path):
    import torch

    with pytest.raises(CacheError, match="not found"):
        Session.load(_model_files(tmp_path / "nowhere"), InferOptions(device="cpu"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model", "config.json"):
        (broken / name).symlink_to(Path(tiny_files.config).parent / name)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CacheError, match="cannot load the model") as err:
        Session.load(_model_files(broken), InferOptions(device="cpu"))
    assert err.value.exit_code == 4
    (broken / "config.json").unlink()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CacheError, match="config"):
        Session.load(_model_files(broken), InferOptions(device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(PreflightError, match="CUDA"):
            Session.load(tiny_files, InferOptions(device="cuda"))


def _load_and_step(files: ModelFiles, quiet: bool) -> subprocess.Popen:
    """A fresh process (nothing imported yet) that loads the tiny model and makes one frame, without importing
    bitsandbytes (the weights are not int8)."""
    paths = [str(p) for p in (files.moshi_weight, files.mimi_weight, files.tokenizer, files.config)]
    script = (
        "from pathlib import Path\nimport numpy as np\n"
        "from jmoshi_cli.cache.artifacts import ModelFiles\nfrom jmoshi_cli.infer import InferOptions, Session\n"
        f"files = ModelFiles(*map(Path, {paths!r}))\n"
        f"model = Session.load(files, InferOptions(device='cpu'), quiet={quiet}).model\n"
        "model.generate(np.zeros(1920, np.float32), [(0, 1)], seed=1)\n"
        # bitsandbytes costs seconds to import, and moshi 0.2.2 would for every layer (upstream/moshi_int8.py)
        "import sys\nassert 'bitsandbytes' not in sys.modules\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_loading_keeps_moshi_noise_off_the_console_unless_asked(tiny_files):
    """Nothing on the console of a quiet load (the progress display), and a loud one runs. The processes are
    independent and run side by side."""
    quiet, loud = _load_and_step(tiny_files, quiet=True), _load_and_step(tiny_files, quiet=False)
    quiet_out, quiet_err = quiet.communicate(timeout=300)
    assert quiet.returncode == 0, quiet_err
    assert (quiet_out, quiet_err) == ("", "")
    loud_err = loud.communicate(timeout=300)[1]
    assert loud.returncode == 0, loud_err


def test_bad_options():
    with pytest.raises(UsageError, match="channel"):
        InferOptions(channel="center")
    with pytest.raises(UsageError, match="device"):
        InferOptions(device="tpu")
    with pytest.raises(UsageError, match="temp"):
        InferOptions(sampling=Sampling(temp=-1.0))
    with pytest.raises(UsageError, match="top_k"):
        InferOptions(sampling=Sampling(top_k=2.5))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="too large"):
        Sampling(seed=2**32)  # moshi.server seeds numpy too, whose seeds stop below 2**32


@pytest.mark.parametrize("ext", ["flac", "mp3", "ogg"])
def test_read_compressed_formats(tmp_path, ext):
    audio = audio_io.read_audio(encoded_file(tmp_path, ext))
    assert (audio.channels, audio.sample_rate) == (2, 8000)
    assert audio.samples >= 800  # MP3 and Vorbis decoders may add their codec's padding
    peaks = np.abs(audio.pcm).max(axis=1)
    assert peaks[0] == pytest.approx(0.3, abs=0.03) and peaks[1] == pytest.approx(0.5, abs=0.03)
    assert audio_io.pick_channel(audio.pcm, "right")[0].max() == pytest.approx(0.5, abs=0.03)


def test_read_audio_formats_and_failures(tmp_path):
    import sphn

    tone = synthetic(0.5, 24000, channels=2)
    ogg = tmp_path / "voice.ogg"  # Ogg Opus: sphn.read refuses it, read_opus takes over
    sphn.write_opus(str(ogg), tone[:1], 24000)
    audio = audio_io.read_audio(ogg)
    assert audio.sample_rate == 48000 and audio.channels == 1 and audio.duration_s > 0.4
    stereo = write_clip(tmp_path / "st.wav", tone, 22050)
    audio = audio_io.read_audio(stereo)
    assert (audio.channels, audio.sample_rate, audio.samples) == (2, 22050, tone.shape[1])
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp3"
    junk.write_text("this is not audio at all")
    header_only = write_clip(tmp_path / "header.wav", np.zeros((1, 0), np.float32), 16000)
    for path, message in ((empty, "empty file"), (junk, "not a supported audio file"),
                          (header_only, "no audio samples"), (tmp_path / "nope.wav", "no such file")):
        with pytest.raises(audio_io.AudioReadError, match=message):
            audio_io.read_audio(path)


# --------------------------------------------------------------------------------------------
# with the tiny model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_many_inputs_one_model(tiny_files, prompt, tmp_path):
    """The 32 kHz stereo prompt (its first 2 s: each 80 ms frame costs the model's compute, and one
    file's length adds nothing here), a 16 kHz mono clip, a second 'prompt-62' stem in another folder,
    and bad files in between: one model load, every good file's outputs."""
    inputs = tmp_path / "inputs"
    write_clip(inputs / "prompt-62.wav", prompt.pcm[:, :64000], 32000)
    mono16 = audio_io.resample(prompt.pcm[1, 32000:32000 + 48000], 32000, 16000)  # 1.5 s
    write_clip(inputs / "b" / "mono16k.wav", mono16, 16000)
    write_clip(inputs / "c" / "prompt-62.wav", prompt.pcm[:, :16000], 32000)  # 0.5 s
    (inputs / "b" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (inputs / "b" / "empty.flac").write_bytes(b"")

    events: list[tuple] = []
    frames_seen: dict[int, list[tuple[int, int]]] = {}

    def on_file(i, n, src):
        events.append(("file", i, n, src.name))
        frames_seen[i] = []

    def on_frame(done, total):
        frames_seen[len(frames_seen) - 1].append((done, total))

    out = tmp_path / "out"
    session = Session.load(tiny_files, InferOptions(device="cpu", sampling=Sampling(seed=SEED)))
    results = session.run_many(collect_inputs([inputs]), out, on_file=on_file, on_frame=on_frame,
                               on_result=lambda r: events.append(("result", r.ok)))
    by_rel = {str(r.source.relative_to(inputs)): r for r in results}
    assert list(by_rel) == ["b/broken.wav", "b/empty.flac", "b/mono16k.wav", "c/prompt-62.wav", "prompt-62.wav"]
    assert [e for e in events if e[0] == "file"] == [
        ("file", i, 5, Path(k).name) for i, k in enumerate(by_rel)]

    assert not by_rel["b/broken.wav"].ok and "broken.wav" in by_rel["b/broken.wav"].error
    assert not by_rel["b/empty.flac"].ok and "empty file" in by_rel["b/empty.flac"].error
    assert by_rel["b/broken.wav"].outputs == {}

    check_outputs(by_rel["prompt-62.wav"], 64000, 32000)
    assert by_rel["prompt-62.wav"].frames == 25  # 2 s = 25 frames of 80 ms, exactly
    assert by_rel["prompt-62.wav"].channel == "left" and by_rel["prompt-62.wav"].audio_s == 2.0
    check_outputs(by_rel["b/mono16k.wav"], 24000, 16000)
    assert by_rel["b/mono16k.wav"].channel == "mono"
    check_outputs(by_rel["c/prompt-62.wav"], 16000, 32000)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{stem}{suffix}" for stem in ("mono16k", "prompt-62", "c__prompt-62")
                           for suffix in (".jmoshi.wav", ".dialogue.wav", ".transcript.json"))

    # Progress: 0 then every frame, for each good file.
    assert frames_seen[4] == [(k, 25) for k in range(26)]
    assert frames_seen[0] == []

    # The user's side of the dialogue is the left channel, resampled to 24 kHz, padded.
    dialogue, _ = read_wav_pcm16(by_rel["prompt-62.wav"].outputs["dialogue"])
    left = audio_io.resample(prompt.pcm[0, :64000], 32000, SAMPLE_RATE)
    np.testing.assert_allclose(dialogue[0], np.clip(left, -1, 1), atol=1.5 / 32767)

    summary = summarize(results)
    assert summary["files"] == 5 and summary["ok"] == 3 and summary["failed"] == 2
    assert summary["audio_s"] == pytest.approx(4.0)
    for r in results:
        if r.ok:
            assert r.rtf == pytest.approx(r.compute_s / r.audio_s)


@pytest.mark.slow
def test_channels_differ(session, prompt, tmp_path):
    src = write_clip(tmp_path / "two.wav", prompt.pcm[:, 64000:96000], 32000)  # 1 s, both speakers
    left_user = {}
    for channel in ("left", "right", "mix"):
        result = with_options(session, channel=channel).run_file(src, prepare_out_dir(tmp_path / channel))
        check_outputs(result, 32000, 32000)
        assert result.channel == channel and channel in result.note
        dialogue, _ = read_wav_pcm16(result.outputs["dialogue"])
        left_user[channel] = dialogue[0]
    expected = {
        "left": prompt.pcm[0, 64000:96000],
        "right": prompt.pcm[1, 64000:96000],
        "mix": prompt.pcm[:, 64000:96000].mean(axis=0),
    }
    for channel, pcm in expected.items():
        ref = np.zeros(expected_frames(32000, 32000) * FRAME_SIZE, np.float32)
        ref[:24000] = audio_io.resample(pcm, 32000, SAMPLE_RATE)
        np.testing.assert_allclose(left_user[channel], ref, atol=1.5 / 32767)
    assert not np.allclose(left_user["left"], left_user["right"], atol=0.01)
    assert not np.allclose(left_user["mix"], left_user["left"], atol=0.01)
    # What J-Moshi says is not compared: the tiny model's random Mimi encoder gives nearly the same
    # codes for any input (its first codebook does not change at all), so outputs may coincide.


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_differs(session, tmp_path):
    src = write_clip(tmp_path / "in.wav", synthetic(0.6, 44100), 44100)
    outputs = {}
    for tag, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = with_options(session, seed=seed).run_file(src, prepare_out_dir(tmp_path / tag))
        check_outputs(result, 26460, 44100)
        outputs[tag] = {k: p.read_bytes() for k, p in result.outputs.items()}
    assert outputs["a"]["jmoshi"] == outputs["b"]["jmoshi"]
    assert outputs["a"]["dialogue"] == outputs["b"]["dialogue"]
    assert outputs["a"]["transcript"] == outputs["b"]["transcript"]
    assert outputs["a"]["jmoshi"] != outputs["c"]["jmoshi"]
    # Seeding does not leak: the caller's torch generator is left as it was.
    import torch

    torch.manual_seed(99)
    before = torch.rand(3)
    torch.manual_seed(99)
    with_options(session, seed=7).run_file(src, tmp_path / "a", name="again")
    assert torch.equal(torch.rand(3), before)


@pytest.mark.slow
def test_every_frame_is_fed_once_and_output_is_aligned(session, tmp_path):
    """Step accounting: Mimi encodes each input frame once, LMGen gets frame 0 twice (the first
    step only fills the initial position) and one step per further frame; output == input frames."""
    src = write_clip(tmp_path / "in.wav", synthetic(0.5, 24000), 24000)  # 12000 samples: 6.25 frames
    encoded: list[int] = []
    stepped: list[object] = []
    model = session.model
    mimi_encode, lm_step = model.mimi.encode, model.lm_gen.step

    def encode(x):
        encoded.append(int(x.shape[-1]))
        return mimi_encode(x)

    def step(codes):
        stepped.append(codes)
        return lm_step(codes)

    model.mimi.encode, model.lm_gen.step = encode, step
    try:
        result = session.run_file(src, tmp_path)
    finally:
        del model.mimi.encode, model.lm_gen.step
    check_outputs(result, 12000, 24000)
    assert result.frames == 7 and model.max_delay == 1
    assert encoded == [FRAME_SIZE] * 7
    assert len(stepped) == 8 and stepped[0] is stepped[1]
    user, _ = read_wav_pcm16(result.outputs["dialogue"])
    assert np.all(user[0, 12000:] == 0)  # padding to whole frames is silence on the user's side


@pytest.mark.slow
def test_bad_file_among_good_ones_and_unwritable_outputs(session, tmp_path):
    inputs = tmp_path / "in"
    good1 = write_clip(inputs / "good1.wav", synthetic(0.3, 24000), 24000)
    bad = inputs / "bad.wav"
    bad.write_text("definitely not RIFF")
    header_only = write_clip(inputs / "silent-header.wav", np.zeros((1, 0), np.float32), 24000)
    good2 = write_clip(inputs / "good2.wav", synthetic(0.3, 48000, seed=3), 48000)
    blocked = write_clip(inputs / "blocked.wav", synthetic(0.3, 24000, seed=4), 24000)
    flac = encoded_file(inputs, "flac")
    out = tmp_path / "out"
    (out / "blocked.jmoshi.wav").mkdir(parents=True)  # the output cannot be written there
    results = session.run_many([good1, bad, header_only, blocked, good2, flac], out)
    assert [r.ok for r in results] == [True, False, False, False, True, True]
    check_outputs(results[0], 7200, 24000)
    check_outputs(results[4], 14400, 48000)
    check_outputs(results[5], 800, 8000)
    assert results[5].frames == 2
    assert "bad.wav" in results[1].error and "not a readable audio file" in results[1].error
    assert "no audio samples" in results[2].error
    assert "cannot write the outputs" in results[3].error
    assert not (out / "blocked.dialogue.wav").exists() and not (out / "blocked.transcript.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.slow
def test_long_input_is_split_at_the_context(tiny_files, tmp_path):
    """An LM whose context is 8 frames (the same tiny weights: context only sizes the KV cache and
    the attention mask) makes a 1.5 s input (19 frames) go through as 8 + 8 + 3 frames."""
    config = json.loads(Path(tiny_files.config).read_text())
    config["context"] = 8
    config["lm_gen_config"] = {"temp_text": 0.5, "top_k": 100}  # popped like moshi's loaders do
    small = tmp_path / "config.json"
    small.write_text(json.dumps(config))
    session = Session.load(_model_files(Path(tiny_files.config).parent, config=small),
                           InferOptions(device="cpu", sampling=Sampling(seed=SEED)))
    model = session.model
    assert model.max_frames == 8
    assert model.sampling == {"temp": 0.8, "temp_text": 0.5, "top_k": 100, "top_k_text": 25}
    assert (model.lm_gen.temp_text, model.lm_gen.top_k) == (0.5, 100)
    src = write_clip(tmp_path / "long.wav", synthetic(1.5, 24000), 24000)
    result = session.run_file(src, tmp_path)
    check_outputs(result, 36000, 24000)
    assert result.frames == 19 and result.segments == 3
    assert "split into 3 segments" in result.note
    transcript = json.loads(result.outputs["transcript"].read_text())
    assert transcript["segments"] == [{"start_frame": 0, "frames": 8}, {"start_frame": 8, "frames": 8},
                                      {"start_frame": 16, "frames": 3}]
    # Exactly the context: one segment.
    src = write_clip(tmp_path / "fits.wav", synthetic(8 * 0.08, 24000), 24000)
    result = session.run_file(src, tmp_path)
    assert result.ok and result.frames == 8 and result.segments == 1 and result.note is None


def test_sampling_comes_from_options_then_config_then_defaults():
    from jmoshi_cli.infer.generation import resolve_sampling

    defaults = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
    assert resolve_sampling(Sampling().overrides(), {}) == defaults
    cfg = {"temp": 0.6, "top_k_text": 10}
    assert resolve_sampling(Sampling(top_k_text=5, seed=3).overrides(), cfg) == {
        "temp": 0.6, "temp_text": 0.7, "top_k": 250, "top_k_text": 5}


@pytest.mark.slow
def test_same_tokens_and_samples_as_moshi_run_inference(session, tiny_files, tmp_path):
    """On whole frames at 24 kHz, with the same seed, the output equals moshi.run_inference's
    InferenceState (batch 1): same first-frame handling, same alignment, same sampling order."""
    import torch
    from moshi.models import loaders
    from moshi.run_inference import InferenceState

    src = write_clip(tmp_path / "in.wav", synthetic(10 * 0.08, 24000, seed=5), 24000)
    ours = with_options(session, seed=11).run_file(src, tmp_path)
    check_outputs(ours, 19200, 24000)
    transcript = json.loads(ours.outputs["transcript"].read_text())

    cfg = json.loads(Path(tiny_files.config).read_text())
    info = loaders.CheckpointInfo(moshi_weights=tiny_files.moshi_weight, mimi_weights=tiny_files.mimi_weight,
                                  tokenizer=tiny_files.tokenizer, lm_config=dict(cfg), raw_config=cfg,
                                  model_type="moshi", lm_gen_config={})
    # moshi 0.2.13's InferenceState takes the CheckpointInfo where 0.2.2's takes the model type.
    first = next(iter(inspect.signature(InferenceState).parameters))
    with torch.no_grad():
        state = InferenceState(info if first == "checkpoint_info" else "moshi", info.get_mimi("cpu"),
                               info.get_text_tokenizer(), info.get_moshi(device="cpu"), 1, 1.0, "cpu")
        pcm = torch.from_numpy(audio_io.read_audio(src).pcm)[None]
        torch.manual_seed(11)
        (text_tokens, out_pcm), = state.run(pcm)
    mono, _ = read_wav_pcm16(ours.outputs["jmoshi"])
    np.testing.assert_array_equal(audio_io.to_pcm16(mono[0]), audio_io.to_pcm16(out_pcm[0].numpy()))
    # ids 0 and 3 are skipped as upstream does; 1 and 2 are control pieces of the toy tokenizer.
    theirs = [(f, t) for f, t in enumerate(text_tokens.tolist()) if t > 3]
    assert [(p["frame"], p["id"]) for p in transcript["pieces"]] == theirs
