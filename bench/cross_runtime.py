"""Is it the same J-Moshi on both runtimes? Same tiny checkpoint, same seed, same input, on the CPU.

Each runtime's environment runs `generate`, which writes one JSON: for every LM step the Mimi codes
of the input (what the encoder made of the user's audio) and, for every output frame, J-Moshi's text
token and its 8 audio codes. `compare` then says where two such files first differ, stage by stage.
Waveforms are not compared (decoding is float work that differs between torch builds by design).

Result (2 cores, AVX2; moshi 0.2.2 + torch 2.6.0 against moshi 0.2.13 + torch 2.9.1; .ci/run runs it):

- As installed (LM in bfloat16): the input codes are identical; the text tokens and audio codes
  differ from the first frame. The moshi version plays no part: moshi 0.2.2's and 0.2.13's code
  give identical tokens on the same torch (both crossed: 0.2.2 on torch 2.9.1, 0.2.13 on torch 2.6.0).
  Both differences are torch's, on the CPU:
  1. ``Tensor.exponential_``, which moshi's sampler draws from (`moshi/utils/sampling.py`:
     ``argmax(probs / exponential)``): torch <= 2.6 seeds an MKL VSL stream with one draw of torch's
     generator; torch 2.7 disabled that path ("Disable MKL rng until pytorch/pytorch#132395 is
     addressed", commit 738ebb45, reported as pytorch/pytorch#150538) and computes -log1p(-u) from
     torch's own float64 uniforms. Same seed, different samples. `--same-rng` draws as torch >= 2.7
     does on either torch (bit-exact against torch 2.9.1 for float32 and bfloat16).
  2. ``scaled_dot_product_attention`` on bfloat16 (the CPU flash-attention kernel): fed identical
     tensors recorded from the run, torch 2.6.0 and 2.9.1 differ in 21 of 1280 output values by 1-2
     bfloat16 ulps, with the same error against a float64 reference. Likely the fast exp that torch
     2.8's CPU flash attention uses for reduced-precision outputs (pytorch/pytorch#151441); not bisected.
     A 1-ulp change in the depformer flips a near-tie sample from then on.
- `--same-rng --float32` (LM in float32, sampler drawing as torch >= 2.7): identical input codes,
  text tokens and audio codes for every frame. .ci/run gates on this (`compare --strict`).
- On a GPU neither CPU kernel is used (CUDA has its own RNG and attention kernels): not checked here.

    .venv-022/bin/python bench/cross_runtime.py generate --repo R --input in.npy --out a.json [--same-rng --float32]
    .venv/bin/python bench/cross_runtime.py generate --repo R --input in.npy --out b.json [--same-rng --float32]
    python3 bench/cross_runtime.py compare a.json b.json [--strict]

`generate --codes-from A.json` replays runtime A's input codes instead of encoding (tells a Mimi
difference from an LM one). `generate` runs jmoshi's own loading path (generation.load_model: moshi's
loaders, LMGen with the model's sampling) with torch.compile off as jmoshi runs the CPU
(NO_TORCH_COMPILE=1), unless `--compile` keeps upstream's torch.compile on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _input(path: Path, seconds: float):
    import numpy as np

    if path.exists():
        return np.load(path)
    from jmoshi_cli.selftest import speech_like

    pcm = speech_like(seconds)
    np.save(path, pcm)
    return pcm


def use_torch27_cpu_exponential() -> None:
    """Make `Tensor.exponential_` on the CPU draw as torch >= 2.7 does, whatever torch this is.

    moshi samples with `q = probs.new_empty(...).exponential_(1); argmax(probs / q)`. Up to torch 2.6
    the CPU kernel seeds an MKL VSL stream with one 32-bit draw of torch's generator; torch 2.7
    disabled that path (pytorch/pytorch#132395: duplicated multinomial draws; the change is commit
    738ebb45, reported as pytorch/pytorch#150538) and computes -log1p(-u) from torch's own float64
    uniforms. Checked bit for bit against torch 2.9.1's kernel (float32 and bfloat16).
    """
    import torch

    original = torch.Tensor.exponential_

    def exponential_(self, lambd=1.0, *, generator=None):
        if self.device.type != "cpu":
            return original(self, lambd, generator=generator)
        uniform = torch.rand(self.shape, dtype=torch.float64, generator=generator)
        return self.copy_(-torch.log1p(-uniform) / lambd)

    torch.Tensor.exponential_ = exponential_


def _load_float32(files):
    """generation.load_model's steps with the LM in float32 instead of bfloat16 (CPU)."""
    import io

    import torch

    from jmoshi_cli import runtime
    from jmoshi_cli.infer import generation

    runtime.apply_compile_policy("cpu")
    config = generation.read_config(files.config)
    sampling = generation.resolve_sampling({}, config.lm_gen_config or {})
    mimi, tokenizer, lm = generation.load_modules(files, config, torch.device("cpu"), torch.float32, io.StringIO())
    lm_gen = generation._generator(lm, sampling, files.config)
    mimi.streaming_forever(1)
    lm_gen.streaming_forever(1)
    return generation.Model(mimi, lm, lm_gen, tokenizer, torch.device("cpu"), sampling, int(lm_gen.max_delay),
                            int(lm.context) if lm.context else None)


def generate(args: argparse.Namespace) -> int:
    if args.same_rng:
        use_torch27_cpu_exponential()
    if args.compile:
        os.environ.pop("NO_TORCH_COMPILE", None)
    else:
        os.environ["NO_TORCH_COMPILE"] = "1"
    import numpy as np
    import torch

    from jmoshi_cli import runtime
    from jmoshi_cli.audio_io import FRAME_SIZE
    from jmoshi_cli.cache.artifacts import ModelFiles
    from jmoshi_cli.infer import generation

    if args.compile:  # load_model would turn it off on the CPU; keep upstream's behaviour instead
        runtime.apply_compile_policy = lambda device: None
    torch.set_num_threads(args.threads)
    repo = Path(args.repo)
    files = ModelFiles(repo / "model.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
                       repo / "tokenizer_spm_32k_3.model", repo / "config.json")
    started = time.perf_counter()
    model = _load_float32(files) if args.float32 else generation.load_model(files, device="cpu")
    loaded_s = time.perf_counter() - started
    pcm = _input(Path(args.input), args.seconds)
    frames = pcm.shape[0] // FRAME_SIZE
    pcm = pcm[: frames * FRAME_SIZE]
    replay = None
    if args.codes_from:
        replay = [torch.tensor(c, dtype=torch.long).view(1, -1, 1)
                  for c in json.loads(Path(args.codes_from).read_text())["input_codes"]]
    input_codes, text, audio, rms = [], [], [], []
    started = time.perf_counter()
    with torch.no_grad(), model._seeded(args.seed):
        model.mimi.reset_streaming()
        model.lm_gen.reset_streaming()
        steps = model._step_inputs(torch.from_numpy(np.ascontiguousarray(pcm))[None, None], frames)
        for index, codes in enumerate(steps):
            if replay is not None:
                codes = replay[index]
            input_codes.append(codes[0, :, 0].tolist())
            tokens = model.lm_gen.step(codes)
            if tokens is None:
                continue
            text.append(int(tokens[0, 0, 0]))
            audio.append(tokens[0, 1:, 0].tolist())
            out = model.mimi.decode(tokens[:, 1:])[0, 0].float()
            rms.append(round(float(out.pow(2).mean().sqrt()), 6))
    versions = runtime.installed_versions()
    result = {
        "versions": versions, "compile": bool(args.compile), "same_rng": bool(args.same_rng),
        "float32": bool(args.float32), "seed": args.seed, "frames": frames,
        "codes_replayed_from": args.codes_from, "load_s": round(loaded_s, 2),
        "generate_s": round(time.perf_counter() - started, 2),
        "input_codes": input_codes, "text_tokens": text, "audio_codes": audio, "output_rms": rms,
        "text": model.tokenizer.decode([t for t in text if t not in (0, 3)]),
    }
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False) + "\n")
    print(f"moshi {versions['moshi']} torch {versions['torch']}: {frames} frames, "
          f"{sum(t not in (0, 3) for t in text)} text tokens, {result['generate_s']} s -> {args.out}")
    return 0


def _first_difference(a: list, b: list) -> int | None:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_results(a: dict, b: dict) -> dict:
    """Stage by stage: equal or the first frame that differs, and how many frames differ."""
    report = {"a": a["versions"], "b": b["versions"], "compile": [a["compile"], b["compile"]],
              "same_rng": [a.get("same_rng", False), b.get("same_rng", False)], "stages": {}}
    for key in ("input_codes", "text_tokens", "audio_codes"):
        first = _first_difference(a[key], b[key])
        differing = sum(x != y for x, y in zip(a[key], b[key], strict=False)) + abs(len(a[key]) - len(b[key]))
        report["stages"][key] = {"equal": first is None, "first_difference": first, "frames_differing": differing,
                                 "frames": max(len(a[key]), len(b[key]))}
    report["identical"] = all(stage["equal"] for stage in report["stages"].values())
    return report


def compare(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    report = compare_results(a, b)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    name = lambda v: f"moshi {v['moshi']} / torch {v['torch']} / sphn {v['sphn']}"  # noqa: E731
    print(f"A: {name(report['a'])}\nB: {name(report['b'])}")
    for key, stage in report["stages"].items():
        state = "identical" if stage["equal"] else (f"DIFFER from frame {stage['first_difference']} "
                                                    f"({stage['frames_differing']}/{stage['frames']} frames)")
        print(f"  {key:12s} {state}")
    print("same text tokens and audio codes" if report["identical"] else "outputs differ (see above)")
    return 0 if report["identical"] or not args.strict else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run the tiny model on this runtime, write a JSON")
    gen.add_argument("--repo", required=True, help="folder of the tiny checkpoint (tiny_model.cached_tiny_repo)")
    gen.add_argument("--input", required=True, help=".npy of 24 kHz mono float32 (made if missing)")
    gen.add_argument("--out", required=True)
    gen.add_argument("--seed", type=int, default=1234)
    gen.add_argument("--seconds", type=float, default=4.0)
    gen.add_argument("--threads", type=int, default=1, help="torch threads (1: no reduction-order noise)")
    gen.add_argument("--codes-from", help="replay the input codes of this JSON instead of encoding")
    gen.add_argument("--compile", action="store_true", help="keep moshi's torch.compile on (upstream's default)")
    gen.add_argument("--float32", action="store_true", help="run the LM in float32 (jmoshi runs bfloat16)")
    gen.add_argument("--same-rng", action="store_true",
                     help="draw Tensor.exponential_ on the CPU as torch >= 2.7 does (see use_torch27_cpu_exponential)")
    cmp = sub.add_parser("compare", help="compare two JSONs written by generate")
    cmp.add_argument("a")
    cmp.add_argument("b")
    cmp.add_argument("--out", help="write the comparison as JSON")
    cmp.add_argument("--strict", action="store_true", help="exit 1 when the outputs differ")
    args = parser.parse_args(argv)
    return generate(args) if args.command == "generate" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
