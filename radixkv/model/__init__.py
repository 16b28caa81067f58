"""Llama-family model execution over the paged KV pool."""
