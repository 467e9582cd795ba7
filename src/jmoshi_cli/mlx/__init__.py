"""J-Moshi on MLX (Apple Silicon; MLX's CPU backend on Linux): conversion, model and server.

- :mod:`.convert` turns nu-dialogue's PyTorch safetensors into moshi_mlx weights (bf16, q8, q4), once
  per source file, into jmoshi's data folder, and gives Mimi the attention names rustymimi reads.
- :mod:`.model` builds moshi_mlx's LM from those files, exactly the PyTorch model (see mlx_config),
  with a generator that keeps no history beyond what it needs (conversations of any length).
- :mod:`.session` loads it once (`Engine`) and runs one conversation from a fresh state (`Session`), for
  the server and for `jmoshi infer`.
- :mod:`.server` is the child process jmoshi runs: jmoshi's conversation server (the /api/chat protocol
  and web UI of moshi.server) over a one-slot engine (engine/mlx_engine.py).

Nothing here imports mlx, moshi_mlx or rustymimi at import time: only the functions that use them.
"""
