"""jmoshi's own conversation server: the web UI and /api/chat over an engine's slots (engine/).

- `server`: the aiohttp side (gate, web UI, one websocket per conversation, Opus in and out, the
  text joined as transcripts are, the recorder), shared by every engine;
- `ticks`: the slots' frames gathered and stepped together on the model's thread;
- `torch_child`: `serve --conversations N` on torch, N conversations on one loaded J-Moshi.
"""
