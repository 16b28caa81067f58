/* Decode attention over the paged KV pool (CPU). Loaded by cpu_attention.py, which documents it.

   Two implementations of one contract (each query head attends to its request's keys, read
   through the slot list, with an online softmax in float32):
   - attend_float / attend_uint16_t: portable C, vectorised by the compiler; fp32 and bf16 K/V;
   - attend_bf16_avx512 (bf16 K/V, head_dim a multiple of 32, compiled where the compiler targets
     AVX512-BF16): scores with VDPBF16PS (bf16 pairs multiplied exactly, summed in float32), 16
     keys' dot products reduced together by a transpose instead of one horizontal sum each, and
     P.V with VDPBF16PS over pairs of keys (the probabilities rounded to bf16 as flash attention
     does on GPUs; the sums stay float32); over an int8 pool, where AVX512-VNNI is there too,
     integer dot products (VPDPWSSD) on int16 queries and probabilities instead. */
#include "cpu_kernels.h"

#define MAX_HEADS 64
#define MAX_HEAD_DIM 256
#define BLOCK 32

/* Query heads [qh0, qh1) of one request attend to its n keys. KV head h of slot t starts at
   element t * kstr + h * hstr of k (and v), its d values contiguous. q: the request's [heads, d]
   floats; out: the same layout. ks, vs: the codes' scales ([slots, kvh] bf16) when the pool is
   quantized, else NULL. */
#define ATTEND(T, LOAD)                                                                          \
static void attend_##T(const float *q, const T *k, const T *v, const uint16_t *ks,               \
                       const uint16_t *vs, const float *table, const int64_t *slots, int64_t n,  \
                       int64_t kstr, int64_t hstr, int kvh, int group, int d, int qh0, int qh1,  \
                       float scale, float *out) {                                                \
    float m[MAX_HEADS], l[MAX_HEADS], s[MAX_HEADS][BLOCK];                                       \
    float acc[MAX_HEADS][MAX_HEAD_DIM];                                                          \
    (void)table;                                                                                 \
    for (int qh = qh0; qh < qh1; qh++) {                                                         \
        m[qh] = -INFINITY; l[qh] = 0.f;                                                          \
        for (int i = 0; i < d; i++) acc[qh][i] = 0.f;                                            \
    }                                                                                            \
    for (int64_t t0 = 0; t0 < n; t0 += BLOCK) {                                                  \
        int nb = (int)(n - t0 < BLOCK ? n - t0 : BLOCK);                                         \
        for (int j = 0; j < nb; j++) {                                                           \
            const T *kr = k + slots[t0 + j] * kstr;                                              \
            for (int qh = qh0; qh < qh1; qh++) {                                                 \
                const float *qq = q + qh * d;                                                    \
                const T *kh = kr + (qh / group) * hstr;                                          \
                float dot = 0.f;                                                                 \
                _Pragma("omp simd reduction(+:dot)")                                             \
                for (int i = 0; i < d; i++) dot += qq[i] * LOAD(kh[i]);                          \
                if (ks) dot *= bf16_to_f32(ks[slots[t0 + j] * kvh + qh / group]);               \
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
            const T *vr = v + slots[t0 + j] * kstr;                                              \
            for (int qh = qh0; qh < qh1; qh++) {                                                 \
                const T *vh = vr + (qh / group) * hstr;                                          \
                float p = s[qh][j];                                                              \
                if (vs) p *= bf16_to_f32(vs[slots[t0 + j] * kvh + qh / group]);                 \
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
#define LOAD_CODE(x) table[x]
ATTEND(float, LOAD_F32)
ATTEND(uint16_t, LOAD_BF16)
ATTEND(uint8_t, LOAD_CODE)

#if HAVE_AVX512_BF16
#ifdef __AVX512VNNI__
#define HAVE_VNNI 1  /* int8 pools: integer dot products (VPDPWSSD), see attend_bf16_avx512_g */
#else
#define HAVE_VNNI 0
#endif

/* Lane i of the result is the sum of the 16 lanes of a[i]: 45 shuffles and adds for 16 sums
   where one horizontal sum each would take ~8 dependent steps. `integer`: the lanes are int32
   (the shuffles move bits alike; only the adds differ). */
#define ADD(x, y) (integer ? (__m512)_mm512_add_epi32((__m512i)(x), (__m512i)(y)) : _mm512_add_ps(x, y))
static inline __attribute__((always_inline)) __m512 sum16(const __m512 *a, const int integer) {
    __m512 s2[8], s4[4], s8[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3 */
        s2[i] = ADD(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                    _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: the four sources' partial sums */
        s4[i] = ADD(_mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0x44),
                    _mm512_shuffle_ps(s2[2 * i], s2[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)  /* 128-bit lanes summed in pairs */
        s8[i] = ADD(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0x88),
                    _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0xDD));
    return ADD(_mm512_shuffle_f32x4(s8[0], s8[1], 0x88), _mm512_shuffle_f32x4(s8[0], s8[1], 0xDD));
}
#undef ADD

/* No software prefetch: the pool is head-major (token_to_kv_pool.py), so a KV head's keys over
   consecutive slots are one contiguous run that the hardware prefetchers stream; prefetching 64
   keys ahead, which helped the slot-major pool on an earlier machine, made the kernel slower
   (bench/decode_kernel.py, 2026-12-01: 3.9 ms a layer with, 2.0 ms without, head-major). */

static inline __mmask16 first_lanes(int count) {
    return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (count > 0 ? count : 0)) - 1u);
}

/* 32 consecutive K or V values of a head as bf16, from the pool's `kind`. int8 codes convert
   exactly (through float32). fp8 codes are moved into bf16 bits with shifts: sign, exponent and
   mantissa land in their bf16 fields with the exponent not rebiased, so the bf16 value is the
   code's value times 2^-KIND_SHIFT (exactly, subnormals included; VDPBF16PS treats bf16
   subnormals, codes below 2^-6 (e4m3) or 2^-14 (e5m2) of the scale, as zero). */
static inline __m512i load_bf16x32(const uint8_t *p, const int kind) {
    if (kind == KV_SAME) return _mm512_loadu_si512(p);
    __m256i b = _mm256_loadu_si256((const __m256i *)p);
    if (kind == KV_INT8) {
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    /* sign-extended, then shifted so that exponent and mantissa land in their bf16 fields; the
       mask keeps the sign's top copy and clears the others */
    __m512i w = _mm512_cvtepi8_epi16(b);
    if (kind == KV_E4M3)  /* s eeee mmm -> s 0000eeee mmm0000 */
        return _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16((short)0x87ff));
    return _mm512_and_si512(_mm512_slli_epi16(w, 5), _mm512_set1_epi16((short)0x8fff));
}

/* bf16 value of a code = code value * 2^-kind_shift(kind) (see load_bf16x32). */
static inline int kind_shift(int kind) { return kind == KV_E4M3 ? 120 : kind == KV_E5M2 ? 112 : 0; }

/* The `group` query heads of KV head g (q: the request's bf16 [heads, d]) over n keys; out: the
   request's float [heads, d]. Keys in blocks of 32 (two sets of 16 dot products); P.V over pairs
   of keys, whose V rows are interleaved so that VDPBF16PS sums the pair. The accumulators then
   hold a head's dimensions permuted (per 128-bit lane of a 32-value chunk: d = 8L + k from the
   low interleave, 8L + 4 + k from the high one), undone when the result is written. Inlined
   with constant group, d and kind for the common shapes, so the accumulators live in registers.
   Quantized pools: a key's score is its dot product with the codes times its K scale, and its
   probability is multiplied by its V scale before P.V; for fp8 the query is scaled by 2^60 and
   the probabilities by 2^shift (powers of two: exact) so that no product of bf16 values falls
   below float32's normal range, which VDPBF16PS would flush to zero.
   int8 pools (with AVX512-VNNI) skip the conversion of codes to bf16, which was most of the
   work: codes are sign-extended to int16 and multiplied in pairs with VPDPWSSD, summed exactly
   in int32. The query becomes int16 with a scale per head (amax / 32767: 2^-15 of its largest
   value, finer than its bf16 input for the large values), and each block's probabilities (times
   the V scales) int16 with a scale per head and block (their max / 32767); a block's P.V sums
   are exact in int32 and added to the float32 accumulators with that scale. */
static inline __attribute__((always_inline)) void attend_bf16_avx512_g(
        const uint16_t *q, const uint8_t *k, const uint8_t *v, const uint16_t *ks,
        const uint16_t *vs, const int64_t *slots, int64_t n, int64_t kstr, int64_t hstr, int kvh,
        int g, const int group, const int d, const int kind, float scale, float *out) {
    const int dc = d / 32, esz = kind == KV_SAME ? 2 : 1;
    const int ints = HAVE_VNNI && kind == KV_INT8;
    const int64_t row = kstr * esz, off = g * hstr * esz;  /* bytes */
    const int q_shift = kind == KV_E4M3 || kind == KV_E5M2 ? 60 : 0;
    const float score_mul = scale * ldexpf(1.f, kind_shift(kind) - q_shift);
    const float p_mul = ldexpf(1.f, kind_shift(kind));
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    float m[MAX_HEADS], l[MAX_HEADS], kscale[BLOCK], vscale[BLOCK], qscale[MAX_HEADS];
    float pscale[MAX_HEADS];
    uint32_t pw[MAX_HEADS][BLOCK / 2];
    __m512 acc[MAX_HEADS][MAX_HEAD_DIM / 16];
    __m512i qv[MAX_HEADS][MAX_HEAD_DIM / 32];
    for (int h = 0; h < group; h++) {
        const uint16_t *qh = q + (int64_t)(g * group + h) * d;
        m[h] = -INFINITY; l[h] = 0.f; qscale[h] = 1.f;
        for (int c = 0; c < 2 * dc; c++) acc[h][c] = _mm512_setzero_ps();
        if (ints) {
            int16_t q16[MAX_HEAD_DIM];
            float amax = 0.f;
            for (int i = 0; i < d; i++) amax = fmaxf(amax, fabsf(bf16_to_f32(qh[i])));
            qscale[h] = amax > 0.f ? amax / 32767.f : 1.f;
            for (int i = 0; i < d; i++) q16[i] = (int16_t)lrintf(bf16_to_f32(qh[i]) / qscale[h]);
            for (int c = 0; c < dc; c++) qv[h][c] = _mm512_loadu_si512(q16 + 32 * c);
            continue;
        }
        for (int c = 0; c < dc; c++) {
            __m512i x = _mm512_loadu_si512(qh + 32 * c);
            if (q_shift)  /* bf16 exponent + 60, zeros kept zero */
                x = _mm512_maskz_add_epi16(_mm512_test_epi16_mask(x, _mm512_set1_epi16(0x7fff)),
                                           x, _mm512_set1_epi16(q_shift << 7));
            qv[h][c] = x;
        }
    }
    for (int64_t t0 = 0; t0 < n; t0 += BLOCK) {
        int nb = (int)(n - t0 < BLOCK ? n - t0 : BLOCK);
        if (kind != KV_SAME)  /* the block's scales, 8 keys a gather (1.0 past its end) */
            for (int j = 0; j < BLOCK; j += 8) {
                __mmask8 ok = j >= nb ? 0 : nb - j >= 8 ? 0xff : (__mmask8)((1u << (nb - j)) - 1u);
                __m512i idx = _mm512_add_epi64(
                    _mm512_mul_epu32(_mm512_maskz_loadu_epi64(ok, slots + t0 + j),
                                     _mm512_set1_epi64(kvh)),
                    _mm512_set1_epi64(g));
                /* 32 bits ending at the bf16 scale: its float is those bits, low half cleared
                   (a key's index is >= kvh >= 1: the 2 bytes before it are the pool's) */
                __m256i one = _mm256_set1_epi32(0x3f800000), high = _mm256_set1_epi32(~0xffff);
                __m256i kx = _mm512_mask_i64gather_epi32(one, ok, idx, (const char *)ks - 2, 2);
                __m256i vx = _mm512_mask_i64gather_epi32(one, ok, idx, (const char *)vs - 2, 2);
                _mm256_storeu_si256((__m256i *)(kscale + j), _mm256_and_si256(kx, high));
                _mm256_storeu_si256((__m256i *)(vscale + j), _mm256_and_si256(vx, high));
            }
        __m512 s[MAX_HEADS][2];
        for (int half = 0; half < 2; half++) {
            int j0 = 16 * half;
            if (j0 >= nb) {
                for (int h = 0; h < group; h++) s[h][half] = neg_inf;
                continue;
            }
            const uint8_t *kr[16];
            for (int j = 0; j < 16; j++)  /* past the end: the last key again, masked below */
                kr[j] = k + slots[t0 + (j0 + j < nb ? j0 + j : nb - 1)] * row + off;
            __mmask16 valid = first_lanes(nb - j0);
            /* each K row loaded once for the group's query heads; 16 keys' sums reduced at once */
            __m512 dots[MAX_HEADS][16];
            for (int j = 0; j < 16; j++) {
                __m512i kc[MAX_HEAD_DIM / 32];
                for (int c = 0; c < dc; c++)
                    kc[c] = ints ? _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                       (const __m256i *)(kr[j] + 32 * c)))
                                 : load_bf16x32(kr[j] + 32 * c * esz, kind);
                for (int h = 0; h < group; h++) {
                    __m512 a = _mm512_setzero_ps();
                    for (int c = 0; c < dc; c++)
                        a = ints ? (__m512)_mm512_dpwssd_epi32((__m512i)a, qv[h][c], kc[c])
                                 : _mm512_dpbf16_ps(a, (__m512bh)qv[h][c], (__m512bh)kc[c]);
                    dots[h][j] = a;
                }
            }
            __m512 mul = _mm512_set1_ps(score_mul);
            if (kind != KV_SAME) mul = _mm512_mul_ps(_mm512_loadu_ps(kscale + j0), mul);
            for (int h = 0; h < group; h++) {
                __m512 dot = sum16(dots[h], ints);
                if (ints) dot = _mm512_mul_ps(_mm512_cvtepi32_ps((__m512i)dot),
                                              _mm512_set1_ps(qscale[h]));
                s[h][half] = _mm512_mask_blend_ps(valid, neg_inf, _mm512_mul_ps(dot, mul));
            }
        }
        __mmask16 valid0 = first_lanes(nb), valid1 = first_lanes(nb - 16);
        __m512 vmul0 = _mm512_set1_ps(p_mul), vmul1 = vmul0;
        if (kind != KV_SAME) {
            vmul0 = _mm512_mul_ps(_mm512_loadu_ps(vscale), vmul0);
            vmul1 = _mm512_mul_ps(_mm512_loadu_ps(vscale + 16), vmul1);
        }
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
            /* probabilities (times the V scales) in key order, bf16 or int16: 32-bit word jj is
               the pair (2jj, 2jj + 1) */
            if (kind != KV_SAME) { p0 = _mm512_mul_ps(p0, vmul0); p1 = _mm512_mul_ps(p1, vmul1); }
            if (ints) {
                /* a block whose weights are all below 1e-30 (the running max's is 1) adds
                   nothing: dropped rather than scaled by 32767 / pm, which could overflow */
                float pm = _mm512_reduce_max_ps(_mm512_max_ps(p0, p1));
                pm = pm > 1e-30f ? pm : 0.f;
                pscale[h] = pm / 32767.f;
                __m512 to_int = _mm512_set1_ps(pm > 0.f ? 32767.f / pm : 0.f);
                __m256i lo = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(p0, to_int)));
                __m256i hi = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(p1, to_int)));
                _mm512_storeu_si512(pw[h], _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
            } else {
                _mm512_storeu_si512(pw[h], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
            }
        }
        __m512i iacc[MAX_HEADS][MAX_HEAD_DIM / 16];  /* this block's exact P.V sums (int8) */
        if (ints)
            for (int h = 0; h < group; h++)
                for (int c = 0; c < 2 * dc; c++) iacc[h][c] = _mm512_setzero_si512();
        for (int jj = 0; jj < (nb + 1) / 2; jj++) {
            const uint8_t *va = v + slots[t0 + 2 * jj] * row + off;
            const uint8_t *vb = 2 * jj + 1 < nb ? v + slots[t0 + 2 * jj + 1] * row + off
                                                : va;  /* its p is 0 */
            for (int c = 0; c < dc; c++) {
                __m512i a, b;
                if (ints) {
                    a = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(va + 32 * c)));
                    b = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(vb + 32 * c)));
                } else {
                    a = load_bf16x32(va + 32 * c * esz, kind);
                    b = load_bf16x32(vb + 32 * c * esz, kind);
                }
                __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
                for (int h = 0; h < group; h++) {
                    __m512i pp = _mm512_set1_epi32((int)pw[h][jj]);
                    if (ints) {
                        iacc[h][2 * c] = _mm512_dpwssd_epi32(iacc[h][2 * c], lo, pp);
                        iacc[h][2 * c + 1] = _mm512_dpwssd_epi32(iacc[h][2 * c + 1], hi, pp);
                    } else {
                        acc[h][2 * c] = _mm512_dpbf16_ps(acc[h][2 * c], (__m512bh)lo, (__m512bh)pp);
                        acc[h][2 * c + 1] = _mm512_dpbf16_ps(acc[h][2 * c + 1], (__m512bh)hi,
                                                             (__m512bh)pp);
                    }
                }
            }
        }
        if (ints)
            for (int h = 0; h < group; h++)
                for (int c = 0; c < 2 * dc; c++)
                    acc[h][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[h][c]),
                                                _mm512_set1_ps(pscale[h]), acc[h][c]);
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

/* KV heads [g0, g1) of one request; constants for the shapes and pool kinds of SmolLM2 (3 x 64)
   and the Llama/Mistral families (4 or 8 x 128); other shapes run the same code, slower (each
   constant shape adds ~0.3 s to the first-use compile). */
static void attend_bf16_avx512(const uint16_t *q, const uint8_t *k, const uint8_t *v,
                               const uint16_t *ks, const uint16_t *vs, const int64_t *slots,
                               int64_t n, int64_t kstr, int64_t hstr, int kvh, int g0, int g1,
                               int group, int d, int kind, float scale, float *out) {
#define SHAPE(G, D, KIND)                                                                        \
    if (group == G && d == D && kind == KIND) {                                                  \
        for (int g = g0; g < g1; g++)                                                            \
            attend_bf16_avx512_g(q, k, v, ks, vs, slots, n, kstr, hstr, kvh, g, G, D, KIND,      \
                                 scale, out);                                                    \
        return;                                                                                  \
    }
#define SHAPES(KIND) SHAPE(3, 64, KIND) SHAPE(4, 128, KIND) SHAPE(8, 128, KIND)
    SHAPES(KV_SAME) SHAPES(KV_INT8) SHAPES(KV_E4M3) SHAPES(KV_E5M2)
#undef SHAPES
#undef SHAPE
    for (int g = g0; g < g1; g++)
        attend_bf16_avx512_g(q, k, v, ks, vs, slots, n, kstr, hstr, kvh, g, group, d, kind, scale,
                             out);
}
#endif

/* The query heads of KV head g of one bf16 query row (q, out: [heads, d] bf16) over the first n
   of its request's slots, on the path above: for the one-token requests of an extend batch
   (extend_attention.c), which would otherwise pack their whole context to attend with one row.
   Returns 0 where this build has no AVX512-BF16 path (nothing done). */
int attend_row_bf16(const uint16_t *q, const void *k, const void *v, const uint16_t *ks,
                    const uint16_t *vs, int kind, int64_t kstr, int64_t hstr,
                    const int64_t *slots, int64_t n, int kvh, int g, int group, int d,
                    float scale, uint16_t *out) {
#if HAVE_AVX512_BF16
    float of[MAX_HEADS * MAX_HEAD_DIM];
    attend_bf16_avx512(q, (const uint8_t *)k, (const uint8_t *)v, ks, vs, slots, n, kstr, hstr,
                       kvh, g, g + 1, group, d, kind, scale, of);
    for (int i = g * group * d; i < (g + 1) * group * d; i++) out[i] = f32_to_bf16(of[i]);
    return 1;
#else
    (void)q; (void)k; (void)v; (void)ks; (void)vs; (void)kind; (void)kstr; (void)hstr;
    (void)slots; (void)n; (void)kvh; (void)g; (void)group; (void)d; (void)scale; (void)out;
    return 0;
#endif
}

/* 1 when this build has the AVX512-BF16 path (the flags it was compiled with target it). */
int has_avx512_bf16(void) { return HAVE_AVX512_BF16; }

/* q, out: [bs, kvh * group, d] (float, or bf16 when is_bf16); k, v: the pool's [slots, kvh, d]
   in q's dtype (kv_kind KV_SAME) or one-byte codes with bf16 scales ks, vs [slots, kvh] (kstr,
   hstr: the pool's slot and head strides, in elements; its d values contiguous);
   kv_index: rows of `stride` slots; query b reads row rows[b] (row b when rows is NULL) up to
   seq_lens[b] keys. One task per query when there are enough for the threads; otherwise one per
   (query, KV head), so a single long request still uses every thread. `split`: 1 or kvh forces
   one layout (tests), anything else chooses. Either way each query head's result is computed the
   same way (the layout only says which thread computes it): the kernel is batch-invariant.
   `portable`: 1 keeps the portable loops where the AVX512-BF16 path would apply (A/B, tests). */
void decode_attention(const void *q, const void *k, const void *v, const uint16_t *ks,
                      const uint16_t *vs, int kv_kind, int64_t kstr, int64_t hstr,
                      const int64_t *kv_index, int64_t stride,
                      const int64_t *rows, const int64_t *seq_lens, void *out, int bs, int kvh,
                      int group, int d, float scale, int is_bf16, int split, int portable) {
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
            attend_bf16_avx512((const uint16_t *)q + base, (const uint8_t *)k, (const uint8_t *)v,
                               ks, vs, slots, seq_lens[b], kstr, hstr, kvh, qh0 / group,
                               qh1 / group, group, d, kv_kind, scale, of);
            for (int i = qh0 * d; i < qh1 * d; i++) ((uint16_t *)out)[base + i] = f32_to_bf16(of[i]);
            continue;
        }
#endif
        for (int i = qh0 * d; i < qh1 * d; i++)
            qf[i] = is_bf16 ? bf16_to_f32(((const uint16_t *)q)[base + i])
                            : ((const float *)q)[base + i];
        if (kv_kind != KV_SAME)
            attend_uint8_t(qf, (const uint8_t *)k, (const uint8_t *)v, ks, vs,
                           code_table[kv_kind], slots, seq_lens[b], kstr, hstr, kvh, group, d,
                           qh0, qh1, scale, of);
        else if (is_bf16)
            attend_uint16_t(qf, (const uint16_t *)k, (const uint16_t *)v, NULL, NULL, NULL, slots,
                            seq_lens[b], kstr, hstr, kvh, group, d, qh0, qh1, scale, of);
        else
            attend_float(qf, (const float *)k, (const float *)v, NULL, NULL, NULL, slots,
                         seq_lens[b], kstr, hstr, kvh, group, d, qh0, qh1, scale, of);
        for (int i = qh0 * d; i < qh1 * d; i++) {
            if (is_bf16) ((uint16_t *)out)[base + i] = f32_to_bf16(of[i]);
            else ((float *)out)[base + i] = of[i];
        }
    }
}
