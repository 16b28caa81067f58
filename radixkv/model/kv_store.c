/* Store a batch's new K and V into the pool (CPU). Loaded by cpu_store.py, which documents it.

   One pass per (token, KV head): the head's d values copied into its slot, or, in a quantized
   pool, its scale (the head's absolute maximum / the code's largest value, at least 2^-100,
   rounded to bf16) and its codes (each value / that scale, clamped, rounded to the nearest
   code, ties to even) written beside each other. The result is bit for bit what
   radixkv/mem/kv_quant.py's quantize gives: the same float32 divisions (not reciprocal
   multiplications, hence no fast-math in this file) and the same roundings. */
#if defined(__clang__)
#pragma float_control(precise, on)
#elif defined(__GNUC__)
#pragma GCC optimize("no-fast-math")
#endif
#include "cpu_kernels.h"

#define MAX_D 1024

/* The fp8 code (mant_bits of mantissa, exponent bias `bias`) nearest to y, ties to even; |y| is
   at most the kind's largest finite value (clamped by the caller) or NaN. */
static inline uint8_t fp8_code(float y, int mant_bits, int bias) {
    uint32_t bits;
    memcpy(&bits, &y, sizeof bits);
    const uint8_t sign = (uint8_t)((bits >> 24) & 0x80u);
    bits &= 0x7fffffffu;
    if (bits > 0x7f800000u) return sign | 0x7f;  /* NaN (e4m3fn's and one of e5m2's) */
    float a;
    memcpy(&a, &bits, sizeof a);
    if (a < ldexpf(1.f, 1 - bias))  /* the subnormal range: a multiple of 2^(1 - bias - m) */
        return sign | (uint8_t)nearbyintf(ldexpf(a, bias - 1 + mant_bits));
    const int shift = 23 - mant_bits;  /* round float32's mantissa to mant_bits, ties to even */
    bits += (1u << (shift - 1)) - 1u + ((bits >> shift) & 1u);
    return sign | (uint8_t)((bits >> shift) - ((uint32_t)(127 - bias) << mant_bits));
}

static inline uint8_t code_of(float y, int kind) {
    if (kind == KV_INT8) return (uint8_t)(int8_t)nearbyintf(y);
    return kind == KV_E4M3 ? fp8_code(y, 3, 7) : fp8_code(y, 2, 15);
}

/* The largest value of each kind's codes (kv_quant.QUANTIZED). */
static const float QMAX[4] = {0.f, 127.f, 448.f, 57344.f};

/* x: n rows of [kvh, d] (row stride x_row elements, heads d apart), float or bf16 (x_bf16);
   row t goes to slot slots[t] of buf, KV head h at element slot * kstr + h * hstr. kind
   KV_SAME: buf holds x's dtype, copied; else one-byte codes, with bf16 scales at
   scale[slot * kvh + h]. */
static void store(const void *x, int64_t x_row, int x_bf16, const int64_t *slots, int64_t n,
                  int kvh, int d, int kind, void *buf, int64_t kstr, int64_t hstr,
                  uint16_t *scale) {
    const int esz = x_bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) if (n * kvh * d >= 65536)
    for (int64_t i = 0; i < n * kvh; i++) {
        const int64_t t = i / kvh, h = i % kvh, slot = slots[t];
        const uint8_t *src = (const uint8_t *)x + (t * x_row + h * d) * esz;
        if (kind == KV_SAME) {
            memcpy((uint8_t *)buf + (slot * kstr + h * hstr) * esz, src, (size_t)d * esz);
            continue;
        }
        float v[MAX_D], amax = 0.f;
        for (int j = 0; j < d; j++) {
            v[j] = x_bf16 ? bf16_to_f32(((const uint16_t *)src)[j]) : ((const float *)src)[j];
            float a = fabsf(v[j]);
            amax = a > amax || a != a ? a : amax;  /* NaN propagates, as torch's amax */
        }
        const float qmax = QMAX[kind], tiny = 0x1p-100f;
        float s = amax / qmax;
        s = s < tiny ? tiny : s;  /* torch's clamp_(min=): NaN stays NaN */
        const uint16_t sb = f32_to_bf16(s);
        const float sf = bf16_to_f32(sb);
        uint8_t *codes = (uint8_t *)buf + slot * kstr + h * hstr;
        for (int j = 0; j < d; j++) {
            float y = v[j] / sf;
            y = y < -qmax ? -qmax : y > qmax ? qmax : y;
            codes[j] = code_of(y, kind);
        }
        scale[slot * kvh + h] = sb;
    }
}

/* K and V of n tokens into their slots (see store); returns 0 when a head is longer than this
   kernel's buffer (nothing written), else 1. */
int store_kv(const void *k, int64_t k_row, const void *v, int64_t v_row, int x_bf16,
             const int64_t *slots, int64_t n, int kvh, int d, int kind, void *k_buf, void *v_buf,
             int64_t kstr, int64_t hstr, uint16_t *k_scale, uint16_t *v_scale) {
    if (d > MAX_D) return 0;
    store(k, k_row, x_bf16, slots, n, kvh, d, kind, k_buf, kstr, hstr, k_scale);
    store(v, v_row, x_bf16, slots, n, kvh, d, kind, v_buf, kstr, hstr, v_scale);
    return 1;
}
