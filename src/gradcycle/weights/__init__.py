"""Model weights without a full copy: initialise, load and export them shard by shard.

- `pieces`: what each rank holds of each parameter (the whole tensor, an FSDP2 row shard or a
  ZeRO-3 flat partition), as a flat range of the full tensor;
- `init`: random initialisation that depends only on (seed, parameter name, position), so every
  backend and world size draws the same weights while each rank draws only its own part; what
  is drawn is the architecture's own `_init_weights`, replayed on meta stand-ins;
- `pretrained`: reading each rank's part straight from safetensors files;
- `names`: file keys <-> parameter names through transformers' checkpoint key mapping (what
  from_pretrained loads, what save_pretrained writes);
- `safetensors_out`: sharded safetensors written tensor by tensor (the HF export);
- `zero_source`: a DeepSpeed ZeRO checkpoint's fp32 weights, one parameter at a time (export);
- `plan`: what each rank will allocate, printed before start-up allocates it.

docs/fsdp.md ("Start-up") states the design.
"""
