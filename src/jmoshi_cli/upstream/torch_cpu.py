"""Mimi's transposed convolutions on the CPU, computed as torch computes them but without its slow path
(checked on torch 2.9.1: the same numbers, bit for bit; on 2.6.0 they round differently, so there, and on any
torch before 2.9, nothing changes).

On the CPU, torch sends a transposed 1-D convolution of one stream over a few time steps to its native
`slow_conv_transpose2d` rather than oneDNN (aten's `use_mkldnn` heuristic: one group, one stream, a small
input), a matrix multiplication into columns and col2im. For Mimi's decoder's first upsampling (1024 to 512
channels, kernel 16, stride 8) on the two steps of an 80 ms frame, that path takes about 70 ms on one core,
most of the 115 ms Mimi spends decoding a frame. The same product as one matrix multiplication and an
overlap-add (`fold`, torch's own col2im) takes about 3 ms. Only the inputs torch would send to that path take
this one; the rest go to torch's own forward.

Every CPU Mimi jmoshi loads gets it: `jmoshi infer`, the conversation child, and moshi.server in the server
child (through `moshi_server.apply`, which wraps `loaders.get_mimi`). A GPU's convolutions are left alone.
"""

from __future__ import annotations

import types
from typing import Any

CHECKED = ("2.9.1",)
SINCE = (2, 9)  # where the matmul + fold rounds as torch's slow path does


def fast_transposed_convs(module: Any) -> int:
    """Give each plain transposed 1-D convolution under `module` (float32 on the CPU, one group, no padding or
    dilation) the matmul + fold forward; how many got it."""
    import torch

    if not applies():
        return 0
    count = 0
    for conv in module.modules():
        if (isinstance(conv, torch.nn.ConvTranspose1d) and conv.weight.device.type == "cpu"
                and conv.weight.dtype == torch.float32 and conv.groups == 1 and conv.padding == (0,)
                and conv.dilation == (1,) and conv.output_padding == (0,) and conv.padding_mode == "zeros"):
            conv.forward = types.MethodType(_forward, conv)  # type: ignore[method-assign]
            count += 1
    return count


def applies() -> bool:
    """Whether this torch gets the matmul + fold forward (where it rounds as torch's slow path does)."""
    import torch

    from .. import runtime

    return runtime.version_tuple(torch.__version__) >= SINCE


# aten's use_mkldnn: a float32 transposed convolution of one group and a kernel longer than 1 goes to oneDNN
# when the batch holds more than one stream or the input more than this many values; otherwise to the slow path.
SLOW_PATH_MAX_VALUES = 20480


def _forward(conv: Any, x: Any) -> Any:
    import torch
    import torch.nn.functional as F

    if x.dim() != 3 or x.shape[0] != 1 or x.shape[1] * x.shape[2] > SLOW_PATH_MAX_VALUES or x.shape[2] == 0:
        return torch.nn.ConvTranspose1d.forward(conv, x)  # oneDNN's (or torch's refusal): left as it is
    batch, channels_in, steps = x.shape
    _, channels_out, kernel = conv.weight.shape
    stride = conv.stride[0]
    columns = (x.transpose(1, 2) @ conv.weight.reshape(channels_in, channels_out * kernel)).transpose(1, 2)
    y = F.fold(columns, (1, (steps - 1) * stride + kernel), (1, kernel), stride=(1, stride)).squeeze(2)
    return y if conv.bias is None else y + conv.bias[:, None]
