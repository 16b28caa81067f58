"""Triton kernels for attention over the paged KV pool (installed as `radixkv.kernels`).

- `kv_store`: scatter a batch's new K/V into one layer of the pool at `out_cache_loc`.
- `decode_attention`: one query per request, split-K over the sequence + log-sum-exp merge, GQA.
- `extend_attention`: new tokens over their cached prefix (through the slot list) and themselves,
  causally, in one kernel with one online softmax.

This package imports nothing itself, so `import radixkv.kernels` works without `triton`; the
submodules need it. See `docs/kernels.md` for access patterns, grids and expected GPU behaviour.
"""
