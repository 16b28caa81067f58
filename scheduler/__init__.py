"""The prefix-aware scheduler process (installed as `radixkv.scheduler`)."""
