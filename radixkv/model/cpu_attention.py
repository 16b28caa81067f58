"""Decode attention that reads K/V straight from the paged pool (CPU, a small C kernel).

The torch path gathers every request's K and V into a workspace and then runs SDPA over it: the
context's K/V cross memory three times (read pool, write workspace, read workspace). This kernel
reads each request's K and V rows through its slot list once, with one online softmax per query
head; the grouped query heads of a KV head share each K/V row read (GQA). It is the CPU
counterpart of `radixkv.kernels`' Triton decode kernel, and what closes most of the gap between
fp32 decode and the memory roofline (docs/model.md).

The C source below is compiled on first use with the system C compiler (`cc -O3 -march=native
-fopenmp`, under a second) into `$RADIXKV_CACHE_DIR/kernels/` (default `~/.cache/radixkv`), keyed
by the source, the compiler, the flags and the CPU's model and feature flags, and loaded with
ctypes: no torch headers, no build step at install time. Without a compiler (or with
`RADIXKV_CPU_KERNEL=0`) the backend keeps the gather + SDPA path; `available()` says which.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from radixkv.model.dtype import cache_root, cpu_identity

log = logging.getLogger("radixkv.model")

MAX_HEADS = 64  # query heads the kernel supports
MAX_HEAD_DIM = 256
BLOCK = 32  # keys scored per block of the online softmax

_SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEADS 64
#define MAX_HEAD_DIM 256
#define BLOCK 32

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);  /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Query heads [qh0, qh1) of one request attend to its n keys. A key's K (and V) row holds every
   KV head ([kvh, d], contiguous), so one pass over the slots reads each row once for all heads.
   q: the request's [heads, d] floats; out: the same layout. */
#define ATTEND(T, LOAD)                                                                          \
static void attend_##T(const float *q, const T *k, const T *v, const int64_t *slots, int64_t n,  \
                       int kvh, int group, int d, int qh0, int qh1, float scale, float *out) {   \
    float m[MAX_HEADS], l[MAX_HEADS], s[MAX_HEADS][BLOCK];                                       \
    float acc[MAX_HEADS][MAX_HEAD_DIM];                                                          \
    int64_t row = (int64_t)kvh * d;                                                              \
    for (int qh = qh0; qh < qh1; qh++) {                                                         \
        m[qh] = -INFINITY; l[qh] = 0.f;                                                          \
        for (int i = 0; i < d; i++) acc[qh][i] = 0.f;                                            \
    }                                                                                            \
    for (int64_t t0 = 0; t0 < n; t0 += BLOCK) {                                                  \
        int nb = (int)(n - t0 < BLOCK ? n - t0 : BLOCK);                                         \
        for (int j = 0; j < nb; j++) {                                                           \
            const T *kr = k + slots[t0 + j] * row;                                               \
            for (int qh = qh0; qh < qh1; qh++) {                                                 \
                const float *qq = q + qh * d;                                                    \
                const T *kh = kr + (qh / group) * d;                                             \
                float dot = 0.f;                                                                 \
                _Pragma("omp simd reduction(+:dot)")                                             \
                for (int i = 0; i < d; i++) dot += qq[i] * LOAD(kh[i]);                          \
                s[qh][j] = dot * scale;                                                          \
            }                                                                                    \
        }                                                                                        \
        for (int qh = qh0; qh < qh1; qh++) {                                                     \
            float mb = m[qh], sum = 0.f;                                                         \
            for (int j = 0; j < nb; j++) mb = s[qh][j] > mb ? s[qh][j] : mb;                     \
            float c = expf(m[qh] - mb);                                                          \
            _Pragma("omp simd reduction(+:sum)")                                                 \
            for (int j = 0; j < nb; j++) { s[qh][j] = expf(s[qh][j] - mb); sum += s[qh][j]; }   \
            l[qh] = l[qh] * c + sum;                                                             \
            _Pragma("omp simd")                                                                  \
            for (int i = 0; i < d; i++) acc[qh][i] *= c;                                         \
            m[qh] = mb;                                                                          \
        }                                                                                        \
        for (int j = 0; j < nb; j++) {                                                           \
            const T *vr = v + slots[t0 + j] * row;                                               \
            for (int qh = qh0; qh < qh1; qh++) {                                                 \
                const T *vh = vr + (qh / group) * d;                                             \
                float p = s[qh][j];                                                              \
                float *a = acc[qh];                                                              \
                _Pragma("omp simd")                                                              \
                for (int i = 0; i < d; i++) a[i] += p * LOAD(vh[i]);                             \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    for (int qh = qh0; qh < qh1; qh++) {                                                         \
        float inv = l[qh] > 0.f ? 1.f / l[qh] : 0.f;                                             \
        for (int i = 0; i < d; i++) out[qh * d + i] = acc[qh][i] * inv;                          \
    }                                                                                            \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
ATTEND(float, LOAD_F32)
ATTEND(uint16_t, LOAD_BF16)

/* q, out: [bs, kvh * group, d] (float, or bf16 when is_bf16); kv_index: rows of `stride` slots;
   query b reads row rows[b] (row b when rows is NULL) up to seq_lens[b] keys. One task per query
   when there are enough for the threads; otherwise one per (query, KV head), so a single long
   request still uses every thread. `split`: 1 or kvh forces one layout (tests), anything else
   chooses. Either way each query head's result is computed the same way (the layout only says
   which thread computes it): the kernel is batch-invariant. */
void decode_attention(const void *q, const void *k, const void *v, const int64_t *kv_index,
                      int64_t stride, const int64_t *rows, const int64_t *seq_lens, void *out,
                      int bs, int kvh, int group, int d, float scale, int is_bf16, int split) {
    int heads = kvh * group;
    if (split != 1 && split != kvh) split = bs >= 2 * omp_get_max_threads() ? 1 : kvh;
    #pragma omp parallel for schedule(static)
    for (int task = 0; task < bs * split; task++) {
        int b = task / split, part = task % split;
        int qh0 = part * (heads / split), qh1 = qh0 + heads / split;
        int64_t base = (int64_t)b * heads * d;
        float qf[MAX_HEADS * MAX_HEAD_DIM], of[MAX_HEADS * MAX_HEAD_DIM];
        for (int i = qh0 * d; i < qh1 * d; i++)
            qf[i] = is_bf16 ? bf16_to_f32(((const uint16_t *)q)[base + i])
                            : ((const float *)q)[base + i];
        const int64_t *slots = kv_index + (rows ? rows[b] : (int64_t)b) * stride;
        if (is_bf16)
            attend_uint16_t(qf, (const uint16_t *)k, (const uint16_t *)v, slots, seq_lens[b],
                            kvh, group, d, qh0, qh1, scale, of);
        else
            attend_float(qf, (const float *)k, (const float *)v, slots, seq_lens[b], kvh, group,
                         d, qh0, qh1, scale, of);
        for (int i = qh0 * d; i < qh1 * d; i++) {
            if (is_bf16) ((uint16_t *)out)[base + i] = f32_to_bf16(of[i]);
            else ((float *)out)[base + i] = of[i];
        }
    }
}
"""

# -ffast-math vectorises expf and the reductions; -fno-finite-math-only keeps -inf (the softmax's
# starting maximum) meaning -inf. Only for compiling: linked with -ffast-math, the library would
# pull in crtfastmath.o, whose constructor turns on flush-to-zero for the whole process.
_COMPILE = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-fPIC",
            "-std=c11", "-c")  # fmt: skip
_LINK = ("-shared", "-fopenmp")


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _build() -> Path:
    """Compile the kernel (once per source, compiler, flags and CPU) and return the library."""
    cc = os.environ.get("CC", "cc")
    ident = "\0".join((_SOURCE, cc, *_COMPILE, *_LINK, cpu_identity()))
    target = _cache_dir() / f"decode_attention_{hashlib.sha256(ident.encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, obj = Path(tmp) / "decode_attention.c", Path(tmp) / "decode_attention.o"
        src.write_text(_SOURCE)
        built = Path(tmp) / target.name
        for cmd in ([cc, *_COMPILE, str(src), "-o", str(obj)],
                    [cc, *_LINK, str(obj), "-o", str(built), "-lm"]):  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("RADIXKV_CPU_KERNEL", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # RuntimeError: no home
        detail = getattr(exc, "stderr", "") or exc
        log.warning("CPU decode attention kernel unavailable (%s); using gather + SDPA", detail)
        return None
    fn = lib.decode_attention
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                   ctypes.c_int, ctypes.c_int]  # fmt: skip
    return lib


def available() -> bool:
    """True when the compiled kernel can be used on this machine."""
    return _library() is not None


def supports(dtype: torch.dtype, num_heads: int, head_dim: int) -> bool:
    """Shapes and dtypes the kernel handles (its per-thread buffers are sized for these)."""
    return (
        dtype in (torch.float32, torch.bfloat16)
        and num_heads <= MAX_HEADS
        and (head_dim <= MAX_HEAD_DIM)
    )


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    kv_index: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    split: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`q [bs, heads, d]` attends to `kv_index[b, :seq_lens[b]]` rows of the pool buffers
    `[slots, kv_heads, d]`; returns `[bs, heads, d]` in q's dtype. All on the CPU; K/V in q's
    dtype; `kv_index` and `seq_lens` int64. The slots themselves are trusted (they come from
    `ReqToTokenPool` rows). `split` (tests): 1 = a task per request, kv_heads = a task per
    (request, KV head), 0 = chosen by batch size and threads. With `rows` (int64 `[bs]`), query b
    reads `kv_index[rows[b]]`: the queries of an extend, each with its own causal length, share
    their request's row (deterministic mode: every attention is this kernel's)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU decode attention kernel is not available")
    bs, heads, d = q.shape
    kvh = k_buf.shape[1]
    group = heads // kvh
    if not (supports(q.dtype, heads, d) and k_buf.dtype == v_buf.dtype == q.dtype):
        raise ValueError(f"unsupported decode attention: q {q.dtype} {tuple(q.shape)}, K/V "
                         f"{k_buf.dtype} {tuple(k_buf.shape)}")  # fmt: skip
    if heads % kvh:
        raise ValueError(f"{heads} query heads do not group evenly over {kvh} KV heads")
    if kv_index.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        raise ValueError("kv_index and seq_lens must be int64")
    longest = int(seq_lens.max()) if bs else 0
    if longest > kv_index.shape[1]:
        raise ValueError(f"a sequence of {longest} keys but rows of {kv_index.shape[1]} slots")
    q = q.contiguous()
    kv_index = kv_index.contiguous()
    seq_lens = seq_lens.contiguous()
    assert k_buf.is_contiguous() and v_buf.is_contiguous()
    if rows is None:
        assert kv_index.shape[0] == bs
        rows_ptr = None
    else:
        rows = rows.contiguous()
        if rows.dtype != torch.int64 or rows.shape != (bs,):
            raise ValueError("rows must be int64 [bs]")
        if bs and not 0 <= int(rows.min()) <= int(rows.max()) < kv_index.shape[0]:
            raise ValueError(f"rows must index the {kv_index.shape[0]} rows of kv_index")
        rows_ptr = rows.data_ptr()
    out = torch.empty_like(q)
    lib.decode_attention(
        q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), kv_index.data_ptr(),
        kv_index.shape[1], rows_ptr, seq_lens.data_ptr(), out.data_ptr(), bs, kvh, group, d,
        scale, int(q.dtype == torch.bfloat16), split,
    )  # fmt: skip
    return out
