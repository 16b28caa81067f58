"""What users run beside the runtime: the `radixkv` command (`cli`), `radixkv bench`, the `make run`
demo, and the workloads, traces and statistics they and `bench/` share."""
