"""Engines: one loaded model that steps conversations in slots (groundwork for `serve --conversations N`).

- `torch_batched`: moshi (>= 0.2.5) on PyTorch, N slots stepped together on a tick; each slot is opened
  (its Mimi and LM state reset alone), fed 80 ms frames, stepped only when its next frame has arrived
  (exec masks), and closed, without touching the others.

The conversation server over engines, its CLI and the MLX engine come next (issue: many conversations
on one loaded model); nothing in jmoshi's commands uses this package yet.
"""
