"""Everything jmoshi does to, or reads from, upstream packages' internals: one place, each with the
versions it was checked against.

- `moshi_private`: reads of moshi's private names (the built-in Moshi-7B kwargs, the Mimi kwargs, the
  bytes a streaming state holds), checked on moshi 0.2.2 and 0.2.13.
- `moshi_sampling`: each conversation of a batch sampling from its own generator, checked on 0.2.13.
- `torch_cpu`: Mimi's transposed convolutions off torch's slow CPU path, the same numbers (torch 2.9).
- `torch_init`: moshi's modules built without the random values their files replace (no torch._dynamo
  import for an LM on the meta device), the same weights.
- `moshi_int8`: bitsandbytes imported for int8 weights only (moshi 0.2.2 imports it for every layer), and
  without the torch.compile set-up of its optimizers (bitsandbytes 0.46+).
- `einops_torch`: einops' torch backend without importing torch._dynamo where nothing compiles (torch < 2.8,
  the documented runtime's).
- `moshi_server`: the patches the server child applies before running moshi.server unchanged (bind
  address, CPU warm-up, config path, int8 scales, the seed, the recording tap's hook, the browser's
  Japanese text), checked on moshi 0.2.2 and 0.2.13.
- `hub_internals`: huggingface_hub's download functions jmoshi wraps (the partial file's truncates and
  a stop per thread, one try per request), checked on huggingface_hub 0.28.1 and 0.36.2.

When a new upstream release changes one of them, the tests of that module fail, not a user's run.
"""
