"""Level 3 of the KV hierarchy: preallocated per-layer K/V tensors and their slot allocator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixkv.mem.kv_quant import SCALE_DTYPE, dequantize, is_quantized, quantize, rotates_keys


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV cache of one model: what a slot (one token's K and V) costs."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def quantized(self) -> bool:
        """One-byte codes with a bf16 scale per token and KV head (`kv_quant.py`)."""
        return is_quantized(self.dtype)

    @property
    def rotated_keys(self) -> bool:
        """Keys are stored in the basis of `kv_quant.key_rotation` (fp8 pools)."""
        return rotates_keys(self.dtype)

    @property
    def head_bytes(self) -> int:
        """One token's K (or V) of one KV head: the values, plus the scale when quantized."""
        scale = SCALE_DTYPE.itemsize if self.quantized else 0
        return self.head_dim * self.dtype_bytes + scale

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer for one token: 2 × layers × KV heads × head bytes (head dim ×
        dtype bytes, plus a 2-byte scale in a quantized pool)."""
        return 2 * self.num_layers * self.kv_heads * self.head_bytes


class TokenToKVPool:
    """Per-layer K and V buffers of `[num_slots + page_size, kv_heads, head_dim]` and an allocator.

    Each buffer is stored head-major (`[kv_heads, slots, head_dim]` in memory, seen through a
    transposed view with the shape above): attention reads one KV head's keys at a time, and in
    this order those reads are one contiguous run per run of consecutive slots instead of
    `head_dim` values every `kv_heads x head_dim`, which the memory system streams about twice as
    fast on the CPU (`bench/decode_kernel.py`). Every reader goes through the view's strides;
    nothing may assume a slot's heads are adjacent.

    Slots are handed out in pages of `page_size` slots. Page 0 (slots `[0, page_size)`) is never
    allocated: it is the write target of padded positions. Usable slots are
    `[page_size, num_slots + page_size)`, so `capacity == num_slots`.

    The free list is a tensor of free page ids; freed pages are parked in a list and merged lazily
    on the next allocation that needs them, so `free` is O(1) per call, as is `available_size()`.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_slots: int,
        *,
        page_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_slots < page_size or num_slots % page_size:
            raise ValueError(
                f"num_slots ({num_slots}) must be a positive multiple of page_size ({page_size})"
            )
        self.layout = layout
        self.page_size = page_size
        self.num_slots = num_slots
        self.num_pages = num_slots // page_size
        self.device = torch.device(device)
        self.k_buffer = [self._head_major_buffer() for _ in range(layout.num_layers)]
        self.v_buffer = [self._head_major_buffer() for _ in range(layout.num_layers)]
        # a quantized pool: one scale per slot and KV head, beside the codes
        scales = (num_slots + page_size, layout.kv_heads) if layout.quantized else (0,)
        self.k_scale = [torch.ones(scales, dtype=SCALE_DTYPE, device=self.device)
                        for _ in range(layout.num_layers)]  # fmt: skip
        self.v_scale = [torch.ones(scales, dtype=SCALE_DTYPE, device=self.device)
                        for _ in range(layout.num_layers)]  # fmt: skip
        self._page_offsets = torch.arange(page_size, dtype=torch.int64)
        self.clear()

    def _head_major_buffer(self) -> torch.Tensor:
        """Zeros stored `[kv_heads, slots, head_dim]`, returned as a `[slots, kv_heads,
        head_dim]` view (see the class docstring)."""
        layout = self.layout
        shape = (layout.kv_heads, self.num_slots + self.page_size, layout.head_dim)
        return torch.zeros(shape, dtype=layout.dtype, device=self.device).transpose(0, 1)

    @classmethod
    def from_memory_budget(
        cls,
        layout: KVLayout,
        budget_bytes: int,
        *,
        page_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> TokenToKVPool:
        """Size the pool to fit `budget_bytes`, including the reserved padding page."""
        page_bytes = layout.bytes_per_token * page_size
        num_pages = budget_bytes // page_bytes - 1
        if num_pages < 1:
            raise ValueError(
                f"a KV memory budget of {budget_bytes} bytes holds no page: one page of "
                f"{page_size} token(s) takes {page_bytes} bytes (2 x {layout.num_layers} layers x "
                f"{layout.kv_heads} KV heads x {layout.head_bytes} bytes per head) and one more "
                f"page is reserved for padding; give at least "
                f"{2 * page_bytes} bytes or lower the page size"
            )
        return cls(layout, num_pages * page_size, page_size=page_size, device=device)

    # ---- allocator -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Number of allocatable slots (the padding page excluded)."""
        return self.num_slots

    def clear(self) -> None:
        """Return every slot to the free list."""
        self._free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int64)
        self._released: list[torch.Tensor] = []
        self._released_pages = 0

    def available_size(self) -> int:
        """Free slots, O(1)."""
        return (len(self._free_pages) + self._released_pages) * self.page_size

    def _take_pages(self, num_pages: int) -> torch.Tensor | None:
        if num_pages > len(self._free_pages) and self._released:
            self._free_pages = torch.cat([self._free_pages, *self._released])
            self._released.clear()
            self._released_pages = 0
        if num_pages > len(self._free_pages):
            return None
        pages = self._free_pages[:num_pages]
        self._free_pages = self._free_pages[num_pages:]
        return pages

    def alloc(self, n: int) -> torch.Tensor | None:
        """Allocate `n` slots (int64), or return None if fewer are free.

        With `page_size > 1`, `n` must be a multiple of the page size and the result is whole pages,
        each page's slots consecutive.
        """
        if n % self.page_size:
            raise ValueError(f"alloc({n}) is not a multiple of page_size {self.page_size}")
        pages = self._take_pages(n // self.page_size)
        if pages is None:
            return None
        if self.page_size == 1:
            return pages
        return (pages[:, None] * self.page_size + self._page_offsets).reshape(-1)

    def alloc_extend(self, prefix_len: int, seq_len: int, last_slot: int) -> torch.Tensor | None:
        """Slots for positions `[prefix_len, seq_len)` of one sequence, or None if short.

        `last_slot` is the slot of position `prefix_len - 1` (ignored when `prefix_len == 0`).
        With pages, positions that fall in the sequence's partly filled last page continue in it,
        the rest take fresh pages: position `p` always lives at offset `p % page_size` of a page.
        """
        n = seq_len - prefix_len
        if n < 0:
            raise ValueError(f"seq_len ({seq_len}) < prefix_len ({prefix_len})")
        if self.page_size == 1:
            return self.alloc(n)
        tail = (-prefix_len) % self.page_size  # room left in the last page
        in_tail = min(tail, n)
        pages = self._take_pages(-(-(n - in_tail) // self.page_size))
        if pages is None:
            return None
        parts = [torch.arange(last_slot + 1, last_slot + 1 + in_tail, dtype=torch.int64)]
        parts.append((pages[:, None] * self.page_size + self._page_offsets).reshape(-1))
        return torch.cat(parts)[:n]

    def alloc_decode(self, seq_lens: torch.Tensor, last_slots: torch.Tensor) -> torch.Tensor | None:
        """One slot per sequence for position `seq_lens[i]`, continuing after `last_slots[i]`."""
        bs = len(seq_lens)
        if self.page_size == 1:
            return self.alloc(bs)
        need_page = seq_lens % self.page_size == 0
        pages = self._take_pages(int(need_page.sum()))
        if pages is None:
            return None
        out = last_slots.to(torch.int64) + 1
        out[need_page] = pages * self.page_size
        return out

    def free(self, slots: torch.Tensor) -> None:
        """Return slots to the allocator. With pages, every page touched by `slots` is freed whole:
        callers only pass slots of pages they own entirely."""
        if slots.numel() == 0:
            return
        pages = slots.to(device="cpu", dtype=torch.int64)  # the allocator lives on the CPU
        if self.page_size > 1:
            # A page's slots sit next to each other in every slot list (rows, tree values), so
            # a consecutive unique finds each page once without sorting.
            pages = torch.unique_consecutive(pages // self.page_size)
        self._released.append(pages)
        self._released_pages += len(pages)

    def free_slots(self) -> torch.Tensor:
        """Every free slot, sorted (for integrity checks and tests; not on the hot path)."""
        pages = torch.cat([self._free_pages, *self._released])
        slots = (pages[:, None] * self.page_size + self._page_offsets).reshape(-1)
        return torch.sort(slots).values

    # ---- K/V access --------------------------------------------------------------------------

    def set_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write `k`, `v` of shape `[len(slots), kv_heads, head_dim]` into `slots` of `layer`
        (quantized to codes and scales in a quantized pool)."""
        if self.layout.quantized:  # K and V in one call: half the small ops of a decode step
            codes, scale = quantize(torch.stack((k, v)), self.layout.dtype)
            self.k_buffer[layer][slots], self.k_scale[layer][slots] = codes[0], scale[0]
            self.v_buffer[layer][slots], self.v_scale[layer][slots] = codes[1], scale[1]
            return
        self.k_buffer[layer][slots] = k.to(self.layout.dtype)
        self.v_buffer[layer][slots] = v.to(self.layout.dtype)

    def read_kv(
        self, layer: int, index: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the slots in `index` (any shape) as `[*index.shape, kv_heads, head_dim]`
        in `dtype`: gathered, and decoded in a quantized pool."""
        k, v = self.k_buffer[layer][index], self.v_buffer[layer][index]
        if not self.layout.quantized:
            return k.to(dtype), v.to(dtype)
        ks, vs = self.k_scale[layer][index], self.v_scale[layer][index]
        return dequantize(k, ks, dtype), dequantize(v, vs, dtype)

    def get_kv_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `[slots, kv_heads]` bf16 scales of a quantized pool's codes (empty otherwise)."""
        return self.k_scale[layer], self.v_scale[layer]

    def get_key_buffer(self, layer: int) -> torch.Tensor:
        return self.k_buffer[layer]

    def get_value_buffer(self, layer: int) -> torch.Tensor:
        return self.v_buffer[layer]

    def get_kv_buffer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer], self.v_buffer[layer]

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the K and V buffers (the padding page included)."""
        return (self.num_slots + self.page_size) * self.layout.bytes_per_token
