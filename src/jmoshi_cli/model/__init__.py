"""Model preparation, shared by `serve` and `infer`: which weights, held how, from which files.

- `preparation`: one preparation, returning one `PreparedModel`;
- `precision`: bf16, int8 or int4, decided once and carried as one value;
- `finetune` and `lora`: a local checkpoint or a LoRA adapter, checked from their files;
- `quantize` and `derived`: weights jmoshi makes once from a verified source (int8), written in one step;
- `lm_config`: the one reader and writer of LM config files.
"""
