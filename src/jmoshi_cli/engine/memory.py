"""How much memory one more conversation costs on a loaded model, and how many fit.

A conversation's state is mostly the LM's key-value cache: for each of its layers, keys and values
for the whole context (moshi's RingKVCache: 2 x context x dim, in the model's dtype; float16 under
int8 weights, the same two bytes). The depformer's cache holds `depformer_context` steps (moshi's
default: one step's codebooks, dep_q), Mimi's transformers 250 frames of 512 float32 each way. J-Moshi
(32 layers, dim 4096, context 3000): about 1.59 GB a conversation, in bf16 and in int8 alike. Checked
against the tensors moshi holds in its streaming states (tests/test_conversations_units.py: the tiny
model, float32, within 1 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ..model.preparation import PreparedModel

KV_BYTES = 2  # bf16, or float16 beside int8 weights
# Mimi (moshi's loaders._transformer_kwargs, float32 on every backend): an encoder and a decoder
# transformer of 8 layers each, keys and values for a context of 250 frames of d_model 512.
MIMI_TRANSFORMERS, MIMI_LAYERS, MIMI_CONTEXT, MIMI_DIM, MIMI_FLOAT_BYTES = 2, 8, 250, 512, 4
MIMI_BYTES = MIMI_TRANSFORMERS * MIMI_LAYERS * 2 * MIMI_CONTEXT * MIMI_DIM * MIMI_FLOAT_BYTES  # 16.4 MB
MARGIN = 0.9  # of a GPU's free memory: the rest is for activations, the allocator and the CUDA context
MOST = 64


def per_conversation_bytes(lm_kwargs: dict[str, Any], kv_bytes: int = KV_BYTES) -> int:
    """The state one conversation adds: LM and depformer KV caches (kv_bytes an element: 2 for bf16,
    float16 or int8 weights, 4 for a float32 model such as the tiny test model) and Mimi's (float32)."""
    lm = 2 * lm_kwargs["num_layers"] * lm_kwargs["context"] * lm_kwargs["dim"] * kv_bytes
    steps = lm_kwargs.get("depformer_context") or lm_kwargs.get("dep_q", 8)  # moshi: context, else weights_per_step
    depformer = 2 * lm_kwargs.get("depformer_num_layers", 0) * steps * lm_kwargs.get("depformer_dim", 0) * kv_bytes
    return lm + depformer + MIMI_BYTES


def fit_measured(memory_bytes: float, need_gb: float, per_conversation: float) -> int:
    """`fit`, with the weights taken from a variant's measured need (the catalogue's vram_min_gb or
    vram_min_int8_gb, which hold one conversation and the activations) less that one conversation."""
    return fit(memory_bytes, need_gb * 1e9 - per_conversation, per_conversation)


def fit(free_bytes: float, weights_bytes: float, per_conversation: float) -> int:
    """How many conversations one loaded model holds in this much free memory (0: not even the weights)."""
    room = free_bytes * MARGIN - weights_bytes
    if room < per_conversation:
        return 0
    return min(int(room // per_conversation), MOST)


def parse_count(text: str | None, flag: str) -> int | None:
    """--conversations or --batch: a number from 1 to MOST, None for auto; not given: 1."""
    if text is None:
        return 1
    if text.strip().lower() == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MOST:
        raise UsageError(f"{flag} {text!r} is not a number from 1 to {MOST}, or auto",
                         f"e.g. {flag} 4 (auto: as many as fit the GPU's memory)")
    return count


@dataclass(frozen=True)
class Room:
    """What `auto` found: how many fit, and why."""

    count: int
    per_conversation: int
    need_gb: float
    free_bytes: int | None = None  # None: on the CPU
    gpu: int | None = None

    def says(self, flag: str, unit: str = "at once") -> str:
        if self.gpu is None:
            return f"{flag} auto: 1 on the CPU (far slower than real time even for one)"
        return (f"{flag} auto: {self.count} {unit} ({self.per_conversation / 1e9:.2f} GB each beside the model's "
                f"{self.need_gb:.1f} GB, in {(self.free_bytes or 0) / 1e9:.1f} GB free on GPU {self.gpu})")


def room_for(device: str, model: PreparedModel, flag: str) -> Room:
    """`auto` for a prepared model: its variant's measured need at the precision chosen, and what one more
    conversation costs on its LM config."""
    from ..model import lm_config
    from ..model.precision import Precision

    variant = model.variant
    need = variant.vram_min_int8_gb if model.precision is Precision.INT8 else variant.vram_min_gb
    return auto(device, need, per_conversation_bytes(lm_config.lm_kwargs(model.files.config)), flag)


def auto(device: str, need_gb: float, per_conversation: int, flag: str) -> Room:
    """`flag` auto: as many as fit in the GPU's free memory beside the model, whose measured need (the
    variant's, at the precision chosen) holds one; 1 on the CPU."""
    from .. import hardware

    if not device.startswith("cuda"):
        return Room(1, per_conversation, need_gb)
    probe = hardware.nvidia()
    if not probe.ok or not probe.value.gpus:
        raise UsageError(f"{flag} auto needs to see the GPU's free memory, and NVML sees no GPU",
                         f"give a number: {flag} N")
    index = int(device.partition(":")[2] or 0)
    gpu = next((g for g in probe.value.gpus if g.index == index), probe.value.gpus[0])
    count = fit_measured(gpu.free_bytes, need_gb, per_conversation)
    if count == 0:
        raise UsageError(f"{flag} auto: not even one conversation fits in {gpu.free_bytes / 1e9:.1f} GB free on "
                         f"GPU {gpu.index} (J-Moshi needs about {need_gb:.1f} GB)",
                         "free the GPU, or use --quantize int8")
    return Room(count, per_conversation, need_gb, gpu.free_bytes, gpu.index)
