"""Engines: one loaded model that steps conversations held in slots (`base.Engine`), under jmoshi's
conversation server (conversations/) and `jmoshi infer --batch`.

- `torch_batched`: moshi (>= 0.2.5) on PyTorch, N slots stepped together on a tick; each slot is opened
  (its Mimi and LM state reset alone), fed 80 ms frames, stepped only when its next frame has arrived
  (exec masks), and closed, without touching the others; seeded per slot.
- `mlx_engine`: moshi_mlx on MLX, one slot (moshi_mlx cannot reset one stream of a batch).
- `memory`: what one more conversation costs, and how many fit in a GPU's memory.
"""
