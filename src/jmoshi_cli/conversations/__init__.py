"""jmoshi's own conversation server: the web UI and /api/chat over an engine's slots (engine/).

- `server`: the aiohttp side (gate, web UI, one websocket per conversation, Opus in and out, the
  text joined as transcripts are, the recorder), the same for every engine;
- `ticks`: the slots' frames gathered and stepped together on the model's thread;
- `torch_child`: `serve --conversations N` on torch, N conversations on one loaded J-Moshi.

The MLX backend's child (mlx/server.py) serves its one-slot engine with the same server.
"""
