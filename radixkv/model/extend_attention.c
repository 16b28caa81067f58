/* Extend (prefill) attention over the paged KV pool (CPU, AVX512-BF16). Loaded with the decode
   kernel by cpu_attention.py, which documents it.

   Query t of request b (position prefix_b + t) attends to the request's keys 0 .. prefix_b + t,
   read through its row of slots: one kernel for prompts with nothing cached, for new tokens
   after a cached prefix and for chunks of a long prompt, with no padding, mask or gather.
   Two phases:
   1. pack: each request's K and V, per KV head, as bf16 (codes of a quantized pool times their
      scales, rounded to bf16 as the pool's dequantize does) into the layouts the arithmetic
      streams (K per
      block of 32 keys as [d/2][32] words, a word a key's dimensions 2i and 2i+1; V per pair of
      keys as [d][2], the pair's values of a dimension side by side);
   2. attend, one task per (request, KV head, block of up to 32 query tokens): for every block
      of 32 keys, the scores of all the task's query rows (token x grouped head) with
      VDPBF16PS, each row's query broadcast a word at a time against a packed K word row; the
      causal mask and an online softmax in float32; P.V with VDPBF16PS over pairs of keys, the
      probabilities rounded to bf16 as flash attention does on GPUs (the sums stay float32).
   Requests with a single new token (decoding requests riding in a prefill batch) skip both
   phases: their row attends straight from the pool on the decode kernel's path. */
#include "cpu_kernels.h"

#if HAVE_AVX512_BF16
#define KEYS 32       /* keys per block */
#define MAX_ROWS 128  /* query rows per task: tokens x grouped heads */
#define MAX_D 256

/* Where the pool keeps a slot's KV heads: head g of slot t at element t * slot + g * head. */
typedef struct { int64_t slot, head; } strides_t;

/* One K or V row of KV head g of a slot as bf16: copied (kind KV_SAME), or codes times the
   slot's scale for the head. */
static inline void load_row(const uint8_t *buf, const uint16_t *scales, int kind, int64_t slot,
                            strides_t st, int kvh, int g, int d, uint16_t *dst) {
    const int64_t at = slot * st.slot + g * st.head;
    if (kind == KV_SAME) {
        memcpy(dst, buf + at * 2, (size_t)d * 2);
        return;
    }
    const uint8_t *codes = buf + at;
    const float scale = bf16_to_f32(scales[slot * kvh + g]), *table = code_table[kind];
    for (int i = 0; i < d; i++) dst[i] = f32_to_bf16(table[codes[i]] * scale);
}

/* Phase 1 for one request: its first n slots' K and V rows, every KV head. Keys past n, to the
   end of the last block, are zeros (their probabilities are 0, and 0 times a stale NaN would
   not be). kp, vp: this request's part of the workspaces, blocks * 32 * d bf16 per KV head. */
static void pack_request(const uint8_t *k, const uint8_t *v, const uint16_t *ks,
                         const uint16_t *vs, int kind, const int64_t *slots, int64_t n,
                         strides_t st, int kvh, int d, int64_t blocks, uint16_t *kp,
                         uint16_t *vp) {
    const int64_t per_head = blocks * KEYS * d;
    #pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t blk = 0; blk < blocks; blk++)
        for (int g = 0; g < kvh; g++) {
            uint32_t *kb = (uint32_t *)(kp + g * per_head + blk * KEYS * d);
            uint16_t *vb = vp + g * per_head + blk * KEYS * d;
            for (int j = 0; j < KEYS; j++) {
                int64_t t = blk * KEYS + j;
                uint16_t *vj = vb + (j / 2) * 2 * d + (j & 1);
                if (t < n) {
                    uint32_t kr[MAX_D / 2];
                    uint16_t vr[MAX_D];
                    load_row(k, ks, kind, slots[t], st, kvh, g, d, (uint16_t *)kr);
                    load_row(v, vs, kind, slots[t], st, kvh, g, d, vr);
                    for (int i = 0; i < d / 2; i++) kb[i * KEYS + j] = kr[i];
                    for (int i = 0; i < d; i++) vj[2 * i] = vr[i];
                } else {
                    for (int i = 0; i < d / 2; i++) kb[i * KEYS + j] = 0;
                    for (int i = 0; i < d; i++) vj[2 * i] = 0;
                }
            }
        }
}

/* Phase 2, one task: query tokens [t0, t1) of a request whose prompt starts after `prefix`
   cached tokens, the `group` query heads of KV head g; row r = (t - t0) * group + h. q, out:
   the request's [tokens, heads, d] bf16; kp, vp: its packed K/V of KV head g. Inlined with
   constant group and d for the common shapes. */
static inline __attribute__((always_inline)) void attend_rows(
        const uint16_t *q, int heads, const uint16_t *kp, const uint16_t *vp, int64_t prefix,
        int t0, int t1, int g, const int group, const int d, float scale, uint16_t *out) {
    const int rows = (t1 - t0) * group, words = d / 2, dc = d / 16;
    uint32_t qw[MAX_ROWS * MAX_D / 2];  /* row r's query as bf16 pairs, at r * words */
    float o[MAX_ROWS * MAX_D];  /* row r's output sums, at r * d */
    float m[MAX_ROWS], l[MAX_ROWS], s[MAX_ROWS][KEYS];
    uint32_t pw[MAX_ROWS][KEYS / 2];
    int64_t last[MAX_ROWS];  /* the last key row r sees */
    for (int r = 0; r < rows; r++) {
        int t = t0 + r / group, h = r % group;
        memcpy(qw + r * words, q + ((int64_t)t * heads + g * group + h) * d, (size_t)d * 2);
        last[r] = prefix + t;
        m[r] = -INFINITY;
        l[r] = 0.f;
        for (int i = 0; i < d; i++) o[r * d + i] = 0.f;
    }
    const int64_t n = prefix + t1;  /* keys the task's last token sees */
    const __m512 vscale = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(-INFINITY);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t k0 = 0; k0 < n; k0 += KEYS) {
        const uint32_t *kb = (const uint32_t *)(kp + k0 * d);
        const uint16_t *vb = vp + k0 * d;
        /* scores, 8 rows at a time: 16 accumulators (two halves of the block each) */
        for (int r0 = 0; r0 < rows; r0 += 8) {
            const int nr = rows - r0 < 8 ? rows - r0 : 8;
            __m512 a[8][2];
            for (int i = 0; i < 8; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
            for (int w = 0; w < words; w++) {
                __m512bh lo = (__m512bh)_mm512_loadu_si512(kb + w * KEYS);
                __m512bh hi = (__m512bh)_mm512_loadu_si512(kb + w * KEYS + 16);
                for (int i = 0; i < nr; i++) {
                    __m512bh qq = (__m512bh)_mm512_set1_epi32((int)qw[(r0 + i) * words + w]);
                    a[i][0] = _mm512_dpbf16_ps(a[i][0], qq, lo);
                    a[i][1] = _mm512_dpbf16_ps(a[i][1], qq, hi);
                }
            }
            for (int i = 0; i < nr; i++) {
                _mm512_storeu_ps(s[r0 + i], _mm512_mul_ps(a[i][0], vscale));
                _mm512_storeu_ps(s[r0 + i] + 16, _mm512_mul_ps(a[i][1], vscale));
            }
        }
        /* causal mask and online softmax per row; probabilities as bf16 pairs */
        for (int r = 0; r < rows; r++) {
            __m512 s0 = _mm512_loadu_ps(s[r]), s1 = _mm512_loadu_ps(s[r] + 16);
            __mmask16 v0 = 0xffff, v1 = 0xffff;
            if (last[r] - k0 < KEYS - 1) {  /* the block crosses the row's diagonal */
                __m512i lim = _mm512_set1_epi32((int)(last[r] - k0 < -1 ? -1 : last[r] - k0));
                v0 = _mm512_cmple_epi32_mask(lane, lim);
                v1 = _mm512_cmple_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16)), lim);
                s0 = _mm512_mask_blend_ps(v0, neg_inf, s0);
                s1 = _mm512_mask_blend_ps(v1, neg_inf, s1);
            }
            if (!(v0 | v1)) {  /* a row of an earlier token sees none of this block */
                _mm512_storeu_si512(pw[r], _mm512_setzero_si512());
                continue;
            }
            float mb = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
            mb = mb > m[r] ? mb : m[r];
            float corr = expf(m[r] - mb);
            __m512 top = _mm512_set1_ps(mb);
            __m512 p0 = _mm512_maskz_mov_ps(v0, exp512(_mm512_sub_ps(s0, top)));
            __m512 p1 = _mm512_maskz_mov_ps(v1, exp512(_mm512_sub_ps(s1, top)));
            l[r] = l[r] * corr + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
            m[r] = mb;
            if (corr != 1.f)
                for (int c = 0; c < dc; c++) {
                    float *oc = o + r * d + 16 * c;
                    _mm512_storeu_ps(oc, _mm512_mul_ps(_mm512_loadu_ps(oc), _mm512_set1_ps(corr)));
                }
            _mm512_storeu_si512(pw[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        /* O += P.V, 4 rows at a time, over the block's pairs of keys */
        const int pairs = (int)(((n - k0 < KEYS ? n - k0 : KEYS) + 1) / 2);
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const int nr = rows - r0 < 4 ? rows - r0 : 4;
            __m512 a[4][MAX_D / 16];
            for (int i = 0; i < nr; i++)
                for (int c = 0; c < dc; c++) a[i][c] = _mm512_loadu_ps(o + (r0 + i) * d + 16 * c);
            for (int jj = 0; jj < pairs; jj++) {
                const uint16_t *vr = vb + jj * 2 * d;
                for (int c = 0; c < dc; c++) {
                    __m512bh vv = (__m512bh)_mm512_loadu_si512(vr + 32 * c);
                    for (int i = 0; i < nr; i++)
                        a[i][c] = _mm512_dpbf16_ps(
                            a[i][c], (__m512bh)_mm512_set1_epi32((int)pw[r0 + i][jj]), vv);
                }
            }
            for (int i = 0; i < nr; i++)
                for (int c = 0; c < dc; c++) _mm512_storeu_ps(o + (r0 + i) * d + 16 * c, a[i][c]);
        }
    }
    for (int r = 0; r < rows; r++) {
        int t = t0 + r / group, h = r % group;
        uint16_t *dst = out + ((int64_t)t * heads + g * group + h) * d;
        float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int i = 0; i < d; i++) dst[i] = f32_to_bf16(o[r * d + i] * inv);
    }
}

static void attend_task(const uint16_t *q, int heads, const uint16_t *kp, const uint16_t *vp,
                        int64_t prefix, int t0, int t1, int g, int group, int d, float scale,
                        uint16_t *out) {
#define SHAPE(G, D)                                                                              \
    if (group == G && d == D) {                                                                  \
        attend_rows(q, heads, kp, vp, prefix, t0, t1, g, G, D, scale, out);                      \
        return;                                                                                  \
    }
    SHAPE(3, 64) SHAPE(4, 128) SHAPE(8, 128)
#undef SHAPE
    attend_rows(q, heads, kp, vp, prefix, t0, t1, g, group, d, scale, out);
}

/* Query tokens per task: rows = tokens x group stay within MAX_ROWS. */
static inline int task_tokens(int group) { return group <= 4 ? 32 : MAX_ROWS / group; }
#endif

/* decode_attention.c: one query row over its request's slots (the decode kernel's path). */
int attend_row_bf16(const uint16_t *q, const void *k, const void *v, const uint16_t *ks,
                    const uint16_t *vs, int kind, int64_t kstr, int64_t hstr,
                    const int64_t *slots, int64_t n, int kvh, int g, int group, int d,
                    float scale, uint16_t *out);

/* A request with one new token (a decoding request riding in a prefill batch) attends through
   the decode kernel's path, straight from the pool: packing its whole context per layer for a
   single query row cost more than the attention. */
static inline int one_row(int64_t ext_len) { return ext_len == 1; }

/* The workspace (bf16 elements, for K; as much again for V) extend_attention needs. */
int64_t extend_workspace(const int64_t *seq_lens, const int64_t *ext_lens, int bs, int kvh,
                         int d) {
    int64_t total = 0;
    for (int b = 0; b < bs; b++)
        if (!one_row(ext_lens[b])) total += (seq_lens[b] + 31) / 32 * 32 * kvh * d;
    return total;
}

/* Returns 0 where this build has no AVX512-BF16 path (nothing done), else 1.
   q, out: [tokens, heads, d] bf16, request b's queries at rows q_start[b] ..; k, v: the pool's
   [slots, kvh, d] bf16 (kv_kind KV_SAME) or one-byte codes with bf16 scales ks, vs ([slots,
   kvh]), KV head h of slot t at element t * kstr + h * hstr (its d values contiguous);
   request b's slots are kv_index[b] (rows of `stride`); prefix_lens, ext_lens per
   request; ws_k, ws_v: extend_workspace() bf16 elements each. */
int extend_attention(const uint16_t *q, const void *k, const void *v, const uint16_t *ks,
                     const uint16_t *vs, int kv_kind, int64_t kstr, int64_t hstr,
                     const int64_t *kv_index, int64_t stride, const int64_t *prefix_lens,
                     const int64_t *ext_lens, const int64_t *q_start, int bs, int kvh, int group,
                     int d, float scale, uint16_t *ws_k, uint16_t *ws_v, uint16_t *out) {
#if HAVE_AVX512_BF16
    const int heads = kvh * group, qt = task_tokens(group);
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(bs + 1)), tasks = 0;
    off[0] = 0;
    for (int b = 0; b < bs; b++) {
        int64_t n = prefix_lens[b] + ext_lens[b], blocks = (n + KEYS - 1) / KEYS;
        if (one_row(ext_lens[b])) {  /* no packing: a task reading the pool (below) */
            off[b + 1] = off[b];
            tasks += 1;
            continue;
        }
        off[b + 1] = off[b] + blocks * KEYS * kvh * d;
        pack_request(k, v, ks, vs, kv_kind, kv_index + b * stride, n,
                     (strides_t){kstr, hstr}, kvh, d, blocks, ws_k + off[b], ws_v + off[b]);
        tasks += (ext_lens[b] + qt - 1) / qt;
    }
    int64_t *task_req = malloc(sizeof(int64_t) * (size_t)(tasks + 1));
    int64_t *task_t0 = malloc(sizeof(int64_t) * (size_t)(tasks + 1));
    tasks = 0;
    for (int b = 0; b < bs; b++)  /* one-row tasks first: handed out last */
        if (one_row(ext_lens[b])) {
            task_req[tasks] = b;
            task_t0[tasks++] = 0;
        }
    for (int b = 0; b < bs; b++)
        for (int64_t t = 0; t < ext_lens[b] && !one_row(ext_lens[b]); t += qt) {
            task_req[tasks] = b;
            task_t0[tasks++] = t;
        }
    /* the last blocks of each request see the most keys: handed out first */
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks * kvh; i++) {
        int64_t task = tasks - 1 - i / kvh;
        int b = (int)task_req[task], g = (int)(i % kvh), t0 = (int)task_t0[task];
        if (one_row(ext_lens[b])) {
            const int64_t row = q_start[b] * heads * d;
            attend_row_bf16(q + row, k, v, ks, vs, kv_kind, kstr, hstr, kv_index + b * stride,
                            prefix_lens[b] + 1, kvh, g, group, d, scale, out + row);
            continue;
        }
        int t1 = t0 + qt < ext_lens[b] ? t0 + qt : (int)ext_lens[b];
        int64_t per_head = (off[b + 1] - off[b]) / kvh;
        attend_task(q + q_start[b] * heads * d, heads, ws_k + off[b] + g * per_head,
                    ws_v + off[b] + g * per_head, prefix_lens[b], t0, t1, g, group, d, scale,
                    out + q_start[b] * heads * d);
    }
    free(task_t0);
    free(task_req);
    free(off);
    return 1;
#else
    (void)q; (void)k; (void)v; (void)ks; (void)vs; (void)kv_kind; (void)kstr; (void)hstr;
    (void)kv_index; (void)stride; (void)prefix_lens; (void)ext_lens;
    (void)q_start; (void)bs; (void)kvh; (void)group; (void)d; (void)scale; (void)ws_k;
    (void)ws_v; (void)out;
    return 0;
#endif
}
