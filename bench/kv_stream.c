/* bench/kv_stream.py's loops: read the K/V a decode step reads, in three orders, with no
   arithmetic beyond a sum (so the time is the access pattern's). The pool is [slots, kvh, d]
   bf16 (head-major: [kvh, slots, d]); request b's keys are slots[b * n .. b * n + n). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define AHEAD 64  /* keys, as the decode kernel prefetches */

static inline __m512 add_rows(__m512 acc, const uint16_t *kr, const uint16_t *vr, int64_t len) {
    for (int64_t c = 0; c < len; c += 32)
        acc = _mm512_add_ps(acc, _mm512_add_ps((__m512)_mm512_loadu_si512(kr + c),
                                               (__m512)_mm512_loadu_si512(vr + c)));
    return acc;
}

/* order 0: per request, per KV head, every key's d values of that head (the decode kernel's
   order), `prefetch`ing 64 keys ahead like it; 1: per request, every key's whole row (all KV
   heads); 2: a head-major pool, per request and KV head, every key's d values (contiguous). */
float kv_stream(const uint16_t *k, const uint16_t *v, const int64_t *slots, int bs, int n,
                int kvh, int d, int order, int prefetch) {
    const int64_t row = (int64_t)kvh * d, plane = ((int64_t)bs * n + 1) * d;
    float total = 0.f;
    #pragma omp parallel for schedule(static) reduction(+:total)
    for (int b = 0; b < bs; b++) {
        const int64_t *sl = slots + (int64_t)b * n;
        __m512 acc = _mm512_setzero_ps();
        if (order == 1) {
            for (int t = 0; t < n; t++) acc = add_rows(acc, k + sl[t] * row, v + sl[t] * row, row);
        } else {
            for (int g = 0; g < kvh; g++)
                for (int t = 0; t < n; t++) {
                    int64_t at = order == 2 ? g * plane + sl[t] * d : sl[t] * row + g * d;
                    if (prefetch && t + AHEAD < n) {
                        int64_t ahead = order == 2 ? g * plane + sl[t + AHEAD] * d
                                                   : sl[t + AHEAD] * row + g * d;
                        for (int64_t c = 0; c < d * 2; c += 64) {
                            _mm_prefetch((const char *)(k + ahead) + c, _MM_HINT_T0);
                            _mm_prefetch((const char *)(v + ahead) + c, _MM_HINT_T0);
                        }
                    }
                    acc = add_rows(acc, k + at, v + at, d);
                }
        }
        total += _mm512_reduce_add_ps(acc);
    }
    return total;
}
