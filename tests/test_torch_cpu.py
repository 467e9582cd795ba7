"""Mimi's transposed convolutions on the CPU through matmul + fold: the same numbers as torch's own, bit for bit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("moshi")

from jmoshi_cli.upstream import torch_cpu  # noqa: E402

APPLIES = torch_cpu.applies()
needs_it = pytest.mark.skipif(not APPLIES, reason=f"torch {torch.__version__}: rounds otherwise, left alone")


@needs_it
@pytest.mark.parametrize(("channels_in", "channels_out", "kernel", "stride", "batch", "steps", "bias"), [
    (1024, 512, 16, 8, 1, 2, True),  # Mimi's decoder's first upsampling on one 80 ms frame: torch's slow path
    (1024, 512, 16, 8, 1, 1, False),
    (512, 256, 12, 6, 1, 16, True),
    (512, 256, 12, 6, 1, 41, True),  # more than 20480 values: oneDNN's, left to torch
    (64, 32, 8, 4, 3, 100, True),  # a batch of conversations: oneDNN's too
])
def test_the_same_output_as_torchs_own(channels_in, channels_out, kernel, stride, batch, steps, bias):
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose1d(channels_in, channels_out, kernel, stride=stride, bias=bias)
    x = torch.randn(batch, channels_in, steps)
    with torch.no_grad():
        before = conv(x)
        assert torch_cpu.fast_transposed_convs(conv) == 1
        after = conv(x)
    assert after.shape == before.shape and torch.equal(after, before)


def test_an_older_torch_is_left_alone():
    if APPLIES:
        pytest.skip(f"torch {torch.__version__} gets it")
    assert torch_cpu.fast_transposed_convs(torch.nn.ConvTranspose1d(1024, 512, 16, stride=8)) == 0


def test_only_plain_float32_cpu_convolutions_change():
    model = torch.nn.Sequential(torch.nn.ConvTranspose1d(4, 4, 4, stride=2, groups=4),  # channel-wise
                                torch.nn.ConvTranspose1d(4, 4, 4, stride=2, padding=1),
                                torch.nn.ConvTranspose1d(4, 4, 4, stride=2).to(torch.bfloat16),
                                torch.nn.Conv1d(4, 4, 3))
    assert torch_cpu.fast_transposed_convs(model) == 0


@needs_it
@pytest.mark.slow
def test_mimi_decodes_the_same_audio_frame_by_frame():
    """The tiny model's Mimi (moshi's architecture, random weights), streaming: every frame's samples equal."""
    from moshi.models import loaders

    from jmoshi_cli.tiny_model import MIMI_NAME, cached_tiny_repo

    weights = cached_tiny_repo() / MIMI_NAME
    plain, fast = (loaders.get_mimi(str(weights), device="cpu") for _ in range(2))
    assert torch_cpu.fast_transposed_convs(fast) == 4  # SEANet's four upsamplings; the channel-wise one stays
    torch.manual_seed(1)
    codes = torch.randint(0, 2048, (1, 8, 12))
    with torch.no_grad(), plain.streaming(1), fast.streaming(1):
        for step in range(codes.shape[-1]):
            frame = codes[:, :, step:step + 1]
            assert torch.equal(fast.decode(frame), plain.decode(frame)), step
