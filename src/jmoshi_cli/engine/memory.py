"""How much memory one more conversation costs on a loaded model, and how many fit.

A conversation's state is mostly the LM's key-value cache: for each of its layers, keys and values
for the whole context (moshi's RingKVCache: 2 x context x dim, in the model's dtype; float16 under
int8 weights, the same two bytes). The depformer's cache holds one step's codebooks, Mimi's
transformers 250 frames of 512 floats each way. J-Moshi (32 layers, dim 4096, context 3000):
about 1.59 GB a conversation, in bf16 and in int8 alike.
"""

from __future__ import annotations

from typing import Any

KV_BYTES = 2  # bf16, or float16 beside int8 weights
MIMI_BYTES = 2 * 2 * 8 * 250 * 512 * 4  # encoder and decoder transformers: 8 layers, K and V, 250 x 512 float32
MARGIN = 0.9  # of a GPU's free memory: the rest is for activations, the allocator and the CUDA context
MOST = 64


def per_conversation_bytes(lm_kwargs: dict[str, Any]) -> int:
    lm = 2 * lm_kwargs["num_layers"] * lm_kwargs["context"] * lm_kwargs["dim"] * KV_BYTES
    dep_q = lm_kwargs.get("dep_q", 8)
    depformer = 2 * lm_kwargs.get("depformer_num_layers", 0) * dep_q * lm_kwargs.get("depformer_dim", 0) * KV_BYTES
    return lm + depformer + MIMI_BYTES


def fit(free_bytes: float, weights_bytes: float, per_conversation: float) -> int:
    """How many conversations one loaded model holds in this much free memory (0: not even the weights)."""
    room = free_bytes * MARGIN - weights_bytes
    if room < per_conversation:
        return 0
    return min(int(room // per_conversation), MOST)
