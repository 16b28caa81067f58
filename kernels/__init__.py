"""Triton kernels for attention over the paged KV pool (installed as `radixkv.kernels`)."""
