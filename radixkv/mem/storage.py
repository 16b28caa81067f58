"""KV on disk that outlives the process (`--kv-storage-dir DIR`): a runtime restarted on the same
directory serves a known prefix from it instead of computing it again.

Prefixes are stored in blocks of `BLOCK` tokens from the start of the tree key. Block `i` of a key
is named by a hash chain, `h(i) = sha256(h(i-1) + tokens of block i)`, starting from a namespace
that holds the model, the KV layout and dtype (and the basis fp8 keys are stored in) and this
format's version: the same tokens under another model or dtype never name the same file, and a
salted key (cache isolation) hashes its salt in. A file holds a header (magic, version, token
count, payload length, the payload's CRC-32) and the payload: every layer's K and V (and
scales, in a quantized pool) of its tokens. Files are written whole (a temporary file renamed
into place) when a request's prefix is cached (write-through, so a crash loses at most what was
being written); at admission the blocks beyond what the pool and the host tier hold are read
back in order, each checked against its checksum: a missing, truncated or corrupt block ends the
load there (it is counted and removed), never served.

With `--kv-storage-size SIZE` the directory's `.kv` files (every model's and dtype's: the limit
is the directory's) are kept under SIZE bytes by evicting least recently used blocks. A prefix's
blocks are ordered so that its deepest block is the least recent of them (on a write or a read,
the blocks are touched from the deepest to the first): a chain loses its tail first, never its
head, which would make the blocks after it unreachable. Recency lives in the files' mtimes, so a
restarted runtime keeps the order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from radixkv.mem.token_to_kv_pool import TokenToKVPool

BLOCK = 64  # tokens per file; a multiple of every page size that divides it
MAGIC, VERSION = b"RKVB", 2
# magic, version, tokens, payload bytes, the payload's CRC-32 (version 1: its sha256). The
# checksum finds a torn or corrupt file; it is no defence against whoever may write the directory
# (nor was sha256, unkeyed), so the cheaper one serves: zlib's CRC-32 takes ~0.4 of sha256's
# time on a block here (bench/kv_storage.py).
_HEADER = struct.Struct("<4sHIQI")


class DiskStore:
    def __init__(
        self,
        directory: str | Path,
        pool: TokenToKVPool,
        model: str,
        max_bytes: int | None = None,
    ) -> None:
        if BLOCK % pool.page_size:
            raise ValueError(f"--kv-storage-dir needs a page size dividing {BLOCK}, "
                             f"not {pool.page_size}")  # fmt: skip
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pool = pool
        layout = pool.layout
        basis = "/rotated-keys" if layout.rotated_keys else ""  # fp8 keys: kv_quant.py
        self.namespace = hashlib.sha256(
            f"radixkv-kv/{VERSION}/{model}/{layout.num_layers}x{layout.kv_heads}x"
            f"{layout.head_dim}/{layout.dtype}{basis}".encode()
        ).digest()
        self.known: set[bytes] = set()  # blocks seen on disk (or written) by this process
        self.hit_tokens = 0
        self.stored_tokens = 0
        self.corrupt_blocks = 0
        self.evicted_blocks = 0
        self.max_bytes = max_bytes
        if max_bytes is not None and max_bytes < BLOCK * pool.layout.bytes_per_token:
            raise ValueError(
                f"--kv-storage-size {max_bytes} bytes holds no block of {BLOCK} tokens "
                f"({BLOCK * pool.layout.bytes_per_token} bytes)"
            )
        # every block file in the directory, least recently used first, with its size
        self.files: OrderedDict[Path, int] = OrderedDict()
        self.bytes = 0
        if max_bytes is not None:
            found = []
            for path in self.dir.glob("*/*.kv"):
                try:
                    st = path.stat()
                except OSError:
                    continue
                found.append((st.st_mtime_ns, path, st.st_size))
            for _, path, size in sorted(found):
                self.files[path] = size
                self.bytes += size
            self._evict()

    # ---- names ----------------------------------------------------------------------------------

    def _chain(self, tokens: Sequence[int], blocks: int) -> list[bytes]:
        names, h = [], self.namespace
        for i in range(blocks):
            chunk = tokens[i * BLOCK : (i + 1) * BLOCK]
            h = hashlib.sha256(h + struct.pack(f"<{BLOCK}q", *chunk)).digest()
            names.append(h)
        return names

    def _path(self, name: bytes) -> Path:
        hexname = name.hex()
        return self.dir / hexname[:2] / f"{hexname}.kv"

    def _exists(self, name: bytes) -> bool:
        if name in self.known:
            return True
        if self._path(name).is_file():
            self.known.add(name)
            return True
        return False

    # ---- write ----------------------------------------------------------------------------------

    def write(self, tokens: Sequence[int], slots: torch.Tensor) -> None:
        """Store every whole block of `tokens` (KV in pool `slots`) not on disk yet."""
        blocks = len(tokens) // BLOCK
        names = self._chain(tokens, blocks)
        for i, name in enumerate(names):
            if self._exists(name):
                continue
            payload = self._serialize(slots[i * BLOCK : (i + 1) * BLOCK])
            header = _HEADER.pack(MAGIC, VERSION, BLOCK, len(payload), zlib.crc32(payload))
            path = self._path(name)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with tmp.open("wb") as f:
                f.write(header)
                f.write(payload)
            tmp.replace(path)
            self.known.add(name)
            self.stored_tokens += BLOCK
            if self.max_bytes is not None:
                self.bytes += len(header) + len(payload) - self.files.pop(path, 0)
                self.files[path] = len(header) + len(payload)
        self._touch(names)
        self._evict()

    # ---- the size limit -------------------------------------------------------------------------

    def _touch(self, names: list[bytes]) -> None:
        """Mark a prefix's blocks used now, its first block the most recent (see the module)."""
        if self.max_bytes is None or not names:
            return
        now = time.time_ns()
        for depth, name in enumerate(reversed(names)):  # deepest first: oldest of the chain
            path = self._path(name)
            if path in self.files:
                self.files.move_to_end(path)
                with contextlib.suppress(OSError):  # the order outlives the process
                    os.utime(path, ns=(now, now - len(names) + 1 + depth))

    def _evict(self) -> None:
        """Remove least recently used blocks until the directory is within `max_bytes`."""
        if self.max_bytes is None:
            return
        while self.bytes > self.max_bytes and self.files:
            path, size = self.files.popitem(last=False)
            path.unlink(missing_ok=True)
            self.known.discard(bytes.fromhex(path.stem))
            self.bytes -= size
            self.evicted_blocks += 1

    def _serialize(self, slots: torch.Tensor) -> memoryview:
        """The K/V (and scales) of `slots`, layer by layer, gathered straight into one buffer."""
        pool, s = self.pool, slots.to(self.pool.device)
        sources = []
        for layer in range(pool.layout.num_layers):
            sources += [pool.k_buffer[layer], pool.v_buffer[layer]]
            if pool.layout.quantized:
                sources += [pool.k_scale[layer], pool.v_scale[layer]]
        sizes = [len(s) * src[0].numel() * src.element_size() for src in sources]
        out = torch.empty(sum(sizes), dtype=torch.uint8)
        offset = 0
        for src, size in zip(sources, sizes, strict=True):
            part = out[offset : offset + size].view(src.dtype).view(len(s), *src.shape[1:])
            if src.device == out.device:
                torch.index_select(src, 0, s, out=part)
            else:
                part.copy_(src[s])
            offset += size
        view: memoryview = out.numpy().data
        return view

    # ---- read -----------------------------------------------------------------------------------

    def longest(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens[:-1]` are on disk, in whole blocks."""
        blocks = (len(tokens) - 1) // BLOCK if tokens else 0
        n = 0
        for name in self._chain(tokens, blocks):
            if not self._exists(name):
                break
            n += BLOCK
        return n

    def pin(self, tokens: Sequence[int]) -> None:
        """(Files need no pinning: the pool's eviction does not touch them.)"""

    def unpin(self, pinned: object) -> None:
        pass

    def load(self, tokens: Sequence[int], start: int, dest: torch.Tensor) -> int:
        """Read positions `[start, start + len(dest))` of `tokens` into pool slots `dest`, block by
        block; returns how many were read (fewer at a missing or corrupt block)."""
        end = start + len(dest)
        names = self._chain(tokens, -(-end // BLOCK))
        done = start
        for i in range(start // BLOCK, len(names)):
            raw = self._read(names[i])
            if raw is None:
                break
            lo, hi = max(done, i * BLOCK), min(end, (i + 1) * BLOCK)
            self._deserialize(raw, lo - i * BLOCK, hi - i * BLOCK, dest[lo - start : hi - start])
            done = hi
        self.hit_tokens += done - start
        self._touch(names[: -(-done // BLOCK)])
        return done - start

    def _read(self, name: bytes) -> bytes | None:
        path = self._path(name)
        try:
            data = path.read_bytes()
        except OSError:
            self.known.discard(name)
            self.bytes -= self.files.pop(path, 0)
            return None
        ok = len(data) >= _HEADER.size
        if ok:
            magic, version, count, size, digest = _HEADER.unpack_from(data)
            payload = data[_HEADER.size :]
            want = BLOCK * self.pool.layout.bytes_per_token
            ok = (magic, version, count, size, len(payload)) == (MAGIC, VERSION, BLOCK, want, want)
            ok = ok and zlib.crc32(payload) == digest
        if not ok:
            self.corrupt_blocks += 1
            self.known.discard(name)
            path.unlink(missing_ok=True)  # never served; a later request writes it again
            self.bytes -= self.files.pop(path, 0)
            return None
        return payload

    def _deserialize(self, payload: bytes, lo: int, hi: int, dest: torch.Tensor) -> None:
        pool = self.pool
        layout = pool.layout
        shapes: list[tuple[torch.dtype, tuple[int, ...]]] = [
            (layout.dtype, (layout.kv_heads, layout.head_dim))
        ] * 2
        if layout.quantized:
            shapes += [(pool.k_scale[0].dtype, (layout.kv_heads,))] * 2
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        offset, d = 0, dest.to(pool.device)
        for layer in range(layout.num_layers):
            targets = [pool.k_buffer[layer], pool.v_buffer[layer]]
            if layout.quantized:
                targets += [pool.k_scale[layer], pool.v_scale[layer]]
            for target, (dtype, shape) in zip(targets, shapes, strict=True):
                size = BLOCK * torch.empty(shape, dtype=dtype).numel() * dtype.itemsize
                block = buf[offset : offset + size].view(dtype).view(BLOCK, *shape)
                target[d] = block[lo:hi].to(pool.device)
                offset += size
