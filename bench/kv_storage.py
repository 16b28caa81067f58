"""What `--kv-storage-dir` costs the scheduler's thread: writing a prefix's blocks and reading them
back, split into the parts of each (no model: a pool of the model's KV shape with random K/V).

    python bench/kv_storage.py [--tokens 1024] [--dtype bfloat16] [--rounds 5]

Write (`DiskStore.write`, write-through when a prefix is cached): gathering the blocks' K/V out
of the pool (`_serialize`), their checksum (CRC-32; the sha256 version 1 of the format used is
timed beside it on the same payloads) and the files (a temporary file renamed into place). Read
(`DiskStore.load`, at admission): the files read and checked, and the K/V scattered into pool
slots. Each round uses a fresh directory and new token ids (nothing
is found on disk before the write). Median of the rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import statistics
import tempfile
import time
import zlib

import torch

from radixkv.mem import KVLayout, TokenToKVPool
from radixkv.mem.storage import BLOCK, DiskStore

SHAPE = (30, 3, 64)  # SmolLM2-135M: layers, KV heads, head dim
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    layout = KVLayout(*SHAPE, DTYPES[args.dtype])
    pool = TokenToKVPool(layout, 2 * args.tokens + BLOCK)
    slots = pool.alloc(args.tokens)
    back = pool.alloc(args.tokens)
    assert slots is not None and back is not None
    for layer in range(layout.num_layers):
        pool.k_buffer[layer].normal_()
        pool.v_buffer[layer].normal_()
    blocks = args.tokens // BLOCK
    times: dict[str, list[float]] = {"write": [], "gather": [], "crc32": [], "sha256": [],
                                     "read": []}  # fmt: skip
    for r in range(args.rounds):
        tokens = list(range(r * 100_000, r * 100_000 + args.tokens))
        with tempfile.TemporaryDirectory() as tmp:
            store = DiskStore(tmp, pool, "bench")
            t0 = time.perf_counter()
            store.write(tokens, slots)
            t1 = time.perf_counter()
            payloads = [store._serialize(slots[i * BLOCK : (i + 1) * BLOCK]) for i in range(blocks)]
            t2 = time.perf_counter()
            for p in payloads:
                zlib.crc32(p)
            t3 = time.perf_counter()
            for p in payloads:
                hashlib.sha256(p).digest()
            t4 = time.perf_counter()
            got = store.load([*tokens, 0], 0, back[: blocks * BLOCK])
            t5 = time.perf_counter()
            assert got == blocks * BLOCK
        times["write"].append(t1 - t0)
        times["gather"].append(t2 - t1)
        times["crc32"].append(t3 - t2)
        times["sha256"].append(t4 - t3)
        times["read"].append(t5 - t4)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    mb = blocks * BLOCK * layout.bytes_per_token / 1e6
    print(f"# kv_storage  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()}  "
          f"{blocks} blocks of {BLOCK} tokens, {args.dtype}, {mb:.1f} MB; median of "
          f"{args.rounds}")  # fmt: skip
    print(f"write  {ms['write']:7.1f} ms: gather {ms['gather']:.1f}, crc32 {ms['crc32']:.1f}, "
          f"files (the rest) {ms['write'] - ms['gather'] - ms['crc32']:.1f}; sha256 of the same "
          f"payloads {ms['sha256']:.1f} (format version 1's checksum)")  # fmt: skip
    print(f"read   {ms['read']:7.1f} ms (read, checked, scattered into the pool)")


if __name__ == "__main__":
    main()
