/* Decode attention over the paged KV pool (CPU). Loaded by cpu_attention.py, which documents it.

   Two implementations of one contract (each query head attends to its request's keys, read
   through the slot list, with an online softmax in float32):
   - attend_float / attend_uint16_t: portable C, vectorised by the compiler; fp32 and bf16 K/V;
   - attend_bf16_avx512 (bf16 K/V, head_dim a multiple of 32, compiled where the compiler targets
     AVX512-BF16): scores with VDPBF16PS (bf16 pairs multiplied exactly, summed in float32), 16
     keys' dot products reduced together by a transpose instead of one horizontal sum each, and
     P.V with VDPBF16PS over pairs of keys (the probabilities rounded to bf16 as flash attention
     does on GPUs; the sums stay float32). */
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


#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1

/* Lane i of the result is the sum of the 16 lanes of a[i]: 45 shuffles and adds for 16 sums
   where one horizontal sum each would take ~8 dependent steps. */
static inline __m512 sum16(const __m512 *a) {
    __m512 s2[8], s4[4], s8[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3 */
        s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                              _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: the four sources' partial sums */
        s4[i] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0x44),
                              _mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)  /* 128-bit lanes summed in pairs */
        s8[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s8[0], s8[1], 0x88),
                         _mm512_shuffle_f32x4(s8[0], s8[1], 0xDD));
}

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

/* Keys between a row's prefetch and its use. The K and V rows of a KV head are 128-256 bytes
   every kvh * d * 2 bytes; the hardware prefetchers follow that stride, but not far enough ahead:
   prefetching 64 keys on made the kernel ~15 % faster at batch 64 with 1k contexts. */
#define AHEAD 64

static inline void prefetch_head(const uint16_t *row, int g, int d) {
    const char *p = (const char *)(row + (int64_t)g * d);
    for (int c = 0; c < 2 * d; c += 64) _mm_prefetch(p + c, _MM_HINT_T0);
}

static inline __mmask16 first_lanes(int count) {
    return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (count > 0 ? count : 0)) - 1u);
}

/* The `group` query heads of KV head g (q: the request's bf16 [heads, d]) over n keys; out: the
   request's float [heads, d]. Keys in blocks of 32 (two sets of 16 dot products); P.V over pairs
   of keys, whose V rows are interleaved so that VDPBF16PS sums the pair. The accumulators then
   hold a head's dimensions permuted (per 128-bit lane of a 32-value chunk: d = 8L + k from the
   low interleave, 8L + 4 + k from the high one), undone when the result is written. Inlined
   with constant group and d for the common shapes, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void attend_bf16_avx512_g(
        const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *slots, int64_t n,
        int kvh, int g, const int group, const int d, float scale, float *out) {
    const int dc = d / 32;
    const int64_t row = (int64_t)kvh * d;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    float m[MAX_HEADS], l[MAX_HEADS];
    uint32_t pw[MAX_HEADS][BLOCK / 2];
    __m512 acc[MAX_HEADS][MAX_HEAD_DIM / 16];
    __m512i qv[MAX_HEADS][MAX_HEAD_DIM / 32];
    for (int h = 0; h < group; h++) {
        m[h] = -INFINITY; l[h] = 0.f;
        for (int c = 0; c < 2 * dc; c++) acc[h][c] = _mm512_setzero_ps();
        for (int c = 0; c < dc; c++)
            qv[h][c] = _mm512_loadu_si512(q + (int64_t)(g * group + h) * d + 32 * c);
    }
    for (int64_t t0 = 0; t0 < n; t0 += BLOCK) {
        int nb = (int)(n - t0 < BLOCK ? n - t0 : BLOCK);
        __m512 s[MAX_HEADS][2];
        for (int half = 0; half < 2; half++) {
            int j0 = 16 * half;
            if (j0 >= nb) {
                for (int h = 0; h < group; h++) s[h][half] = neg_inf;
                continue;
            }
            const uint16_t *kr[16];
            for (int j = 0; j < 16; j++)  /* past the end: the last key again, masked below */
                kr[j] = k + slots[t0 + (j0 + j < nb ? j0 + j : nb - 1)] * row + (int64_t)g * d;
            __mmask16 valid = first_lanes(nb - j0);
            if (t0 + j0 + AHEAD + 16 <= n)  /* rows alone stream, but not far enough ahead */
                for (int j = 0; j < 16; j++)
                    prefetch_head(k + slots[t0 + j0 + AHEAD + j] * row, g, d);
            /* each K row loaded once for the group's query heads; 16 keys' sums reduced at once */
            __m512 dots[MAX_HEADS][16];
            for (int j = 0; j < 16; j++) {
                __m512i kc[MAX_HEAD_DIM / 32];
                for (int c = 0; c < dc; c++) kc[c] = _mm512_loadu_si512(kr[j] + 32 * c);
                for (int h = 0; h < group; h++) {
                    __m512 a = _mm512_setzero_ps();
                    for (int c = 0; c < dc; c++)
                        a = _mm512_dpbf16_ps(a, (__m512bh)qv[h][c], (__m512bh)kc[c]);
                    dots[h][j] = a;
                }
            }
            for (int h = 0; h < group; h++) {
                __m512 sc = _mm512_mul_ps(sum16(dots[h]), _mm512_set1_ps(scale));
                s[h][half] = _mm512_mask_blend_ps(valid, neg_inf, sc);
            }
        }
        __mmask16 valid0 = first_lanes(nb), valid1 = first_lanes(nb - 16);
        for (int h = 0; h < group; h++) {
            float mb = _mm512_reduce_max_ps(_mm512_max_ps(s[h][0], s[h][1]));
            mb = mb > m[h] ? mb : m[h];
            float corr = expf(m[h] - mb);
            __m512 top = _mm512_set1_ps(mb);
            __m512 p0 = _mm512_maskz_mov_ps(valid0, exp512(_mm512_sub_ps(s[h][0], top)));
            __m512 p1 = _mm512_maskz_mov_ps(valid1, exp512(_mm512_sub_ps(s[h][1], top)));
            l[h] = l[h] * corr + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
            m[h] = mb;
            __m512 vc = _mm512_set1_ps(corr);
            for (int c = 0; c < 2 * dc; c++) acc[h][c] = _mm512_mul_ps(acc[h][c], vc);
            /* bf16 probabilities in key order: 32-bit word jj is the pair (2jj, 2jj + 1) */
            _mm512_storeu_si512(pw[h], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        for (int jj = 0; jj < (nb + 1) / 2; jj++) {
            if (t0 + 2 * jj + AHEAD + 1 < n) {
                prefetch_head(v + slots[t0 + 2 * jj + AHEAD] * row, g, d);
                prefetch_head(v + slots[t0 + 2 * jj + AHEAD + 1] * row, g, d);
            }
            const uint16_t *va = v + slots[t0 + 2 * jj] * row + (int64_t)g * d;
            const uint16_t *vb = 2 * jj + 1 < nb ? v + slots[t0 + 2 * jj + 1] * row
                                                   + (int64_t)g * d : va;  /* its p is 0 */
            for (int c = 0; c < dc; c++) {
                __m512i a = _mm512_loadu_si512(va + 32 * c), b = _mm512_loadu_si512(vb + 32 * c);
                __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
                for (int h = 0; h < group; h++) {
                    __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pw[h][jj]);
                    acc[h][2 * c] = _mm512_dpbf16_ps(acc[h][2 * c], (__m512bh)lo, pp);
                    acc[h][2 * c + 1] = _mm512_dpbf16_ps(acc[h][2 * c + 1], (__m512bh)hi, pp);
                }
            }
        }
    }
    for (int h = 0; h < group; h++) {
        float inv = l[h] > 0.f ? 1.f / l[h] : 0.f, lo[16], hi[16];
        float *o = out + (int64_t)(g * group + h) * d;
        for (int c = 0; c < dc; c++) {
            _mm512_storeu_ps(lo, _mm512_mul_ps(acc[h][2 * c], _mm512_set1_ps(inv)));
            _mm512_storeu_ps(hi, _mm512_mul_ps(acc[h][2 * c + 1], _mm512_set1_ps(inv)));
            for (int i = 0; i < 16; i++) {
                o[32 * c + 8 * (i / 4) + i % 4] = lo[i];
                o[32 * c + 8 * (i / 4) + 4 + i % 4] = hi[i];
            }
        }
    }
}

/* KV heads [g0, g1) of one request; constant (group, d) for the shapes models use. */
static void attend_bf16_avx512(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                               const int64_t *slots, int64_t n, int kvh, int g0, int g1,
                               int group, int d, float scale, float *out) {
#define SHAPE(G, D)                                                                              \
    if (group == G && d == D) {                                                                  \
        for (int g = g0; g < g1; g++)                                                            \
            attend_bf16_avx512_g(q, k, v, slots, n, kvh, g, G, D, scale, out);                   \
        return;                                                                                  \
    }
    SHAPE(1, 64) SHAPE(2, 64) SHAPE(3, 64) SHAPE(4, 64) SHAPE(5, 64) SHAPE(8, 64)
    SHAPE(1, 128) SHAPE(2, 128) SHAPE(4, 128) SHAPE(7, 128) SHAPE(8, 128)
#undef SHAPE
    for (int g = g0; g < g1; g++)
        attend_bf16_avx512_g(q, k, v, slots, n, kvh, g, group, d, scale, out);
}
#else
#define HAVE_AVX512_BF16 0
#endif

/* 1 when this build has the AVX512-BF16 path (the flags it was compiled with target it). */
int has_avx512_bf16(void) { return HAVE_AVX512_BF16; }

/* q, out: [bs, kvh * group, d] (float, or bf16 when is_bf16); kv_index: rows of `stride` slots;
   query b reads row rows[b] (row b when rows is NULL) up to seq_lens[b] keys. One task per query
   when there are enough for the threads; otherwise one per (query, KV head), so a single long
   request still uses every thread. `split`: 1 or kvh forces one layout (tests), anything else
   chooses. Either way each query head's result is computed the same way (the layout only says
   which thread computes it): the kernel is batch-invariant. */
void decode_attention(const void *q, const void *k, const void *v, const int64_t *kv_index,
                      int64_t stride, const int64_t *rows, const int64_t *seq_lens, void *out,
                      int bs, int kvh, int group, int d, float scale, int is_bf16, int split,
                      int portable) {
    int heads = kvh * group;
    if (split != 1 && split != kvh) split = bs >= 2 * omp_get_max_threads() ? 1 : kvh;
    #pragma omp parallel for schedule(static)
    for (int task = 0; task < bs * split; task++) {
        int b = task / split, part = task % split;
        int qh0 = part * (heads / split), qh1 = qh0 + heads / split;
        int64_t base = (int64_t)b * heads * d;
        float qf[MAX_HEADS * MAX_HEAD_DIM], of[MAX_HEADS * MAX_HEAD_DIM];
        const int64_t *slots = kv_index + (rows ? rows[b] : (int64_t)b) * stride;
#if HAVE_AVX512_BF16
        if (is_bf16 && d % 32 == 0 && !portable) {
            attend_bf16_avx512((const uint16_t *)q + base, (const uint16_t *)k,
                               (const uint16_t *)v, slots, seq_lens[b], kvh, qh0 / group,
                               qh1 / group, group, d, scale, of);
            for (int i = qh0 * d; i < qh1 * d; i++) ((uint16_t *)out)[base + i] = f32_to_bf16(of[i]);
            continue;
        }
#endif
        for (int i = qh0 * d; i < qh1 * d; i++)
            qf[i] = is_bf16 ? bf16_to_f32(((const uint16_t *)q)[base + i])
                            : ((const float *)q)[base + i];
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
