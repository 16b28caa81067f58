/* What the CPU kernels (decode_attention.c, extend_attention.c, fused_ops.c) share: bf16
   conversions, the values of one-byte KV codes and, where the compiler targets AVX512-BF16, a
   vector exp. */
#ifndef RADIXKV_ATTENTION_COMMON_H
#define RADIXKV_ATTENTION_COMMON_H
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* What the pool stores (kv_kind): the query's dtype (float or bf16), or one-byte codes with a
   bf16 scale per slot and KV head (radixkv/mem/kv_quant.py): value = code * scale. */
enum { KV_SAME = 0, KV_INT8 = 1, KV_E4M3 = 2, KV_E5M2 = 3 };

/* The value of every one-byte code of a kind (the portable path decodes through this table). */
static float code_table[4][256];

static inline float decode_fp8(uint8_t x, int mant_bits, int bias) {
    int e = (x & 0x7f) >> mant_bits, m = x & ((1 << mant_bits) - 1);
    float mag = e ? ldexpf(1.f + (float)m / (float)(1 << mant_bits), e - bias)
                  : ldexpf((float)m / (float)(1 << mant_bits), 1 - bias);
    return x & 0x80 ? -mag : mag;
}

/* Fills code_table when the library is loaded (a constructor: no caller can see it half
   filled, whatever threads call the kernels). */
__attribute__((constructor)) static void fill_code_tables(void) {
    for (int x = 0; x < 256; x++) {
        code_table[KV_INT8][x] = (float)(int8_t)x;
        code_table[KV_E4M3][x] = decode_fp8((uint8_t)x, 3, 7);
        code_table[KV_E5M2][x] = decode_fp8((uint8_t)x, 2, 15);
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1

/* e^x for x <= 0 (Cody-Waite reduction, degree-7 Taylor on |r| <= ln2/2: relative error ~2e-9
   before rounding); below -87 the result is a subnormal or 0, which the caller masks anyway. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#else
#define HAVE_AVX512_BF16 0
#endif
#endif
