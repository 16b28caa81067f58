/* The decoder's small per-layer ops, one pass over memory each (CPU). Loaded by cpu_fused.py,
   which documents them.

   Each op rounds where torch's unfused sequence rounds (bf16: every op's result is rounded to
   bf16 from float32), so a bf16 result differs from torch's only where a float32 reduction
   summed in another order lands on the other side of a bf16 rounding boundary (rare; the tests
   count them). Rows are independent: a row's result never depends on the batch. */
#include "cpu_kernels.h"

/* float32 stored as is; bf16 through the helpers of cpu_kernels.h */
static inline float load_float(const float *p, int64_t i) { return p[i]; }
static inline float load_uint16_t(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline void store_float(float *p, int64_t i, float f) { p[i] = f; }
static inline void store_uint16_t(uint16_t *p, int64_t i, float f) { p[i] = f32_to_bf16(f); }
/* a value rounded to the stored dtype and back (what torch holds between two ops) */
static inline float round_float(float f) { return f; }
static inline float round_uint16_t(float f) { return bf16_to_f32(f32_to_bf16(f)); }

#define LANES 16

/* Each op runs on the other threads too once it has >= 16384 elements (the wake-up costs
   more than a smaller op). */

#define OPS(T)                                                                                   \
/* x += delta (if given), then out = w * rmsnorm(x): torch's                                  \
   `x32 * rsqrt(mean(x32^2) + eps)` rounded to T, times the weight, rounded. x and delta rows   \
   every `x_stride` / `d_stride` elements, out contiguous. */                                   \
static void add_rmsnorm_##T(T *x, int64_t x_stride, const T *delta, int64_t d_stride,          \
                            const T *w, T *out, int64_t rows, int dim, float eps) {            \
    _Pragma("omp parallel for schedule(static) if (rows * dim >= 16384)")                    \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        T *xr = x + r * x_stride, *o = out + r * (int64_t)dim;                                 \
        if (delta) {                                                                            \
            const T *dr = delta + r * d_stride;                                                \
            for (int i = 0; i < dim; i++)                                                       \
                store_##T(xr, i, load_##T(xr, i) + load_##T(dr, i));                           \
        }                                                                                       \
        float part[LANES] = {0};  /* 16 running sums: vectorised without reassociation */      \
        int i = 0;                                                                              \
        for (; i + LANES <= dim; i += LANES)                                                    \
            for (int j = 0; j < LANES; j++) {                                                   \
                float f = load_##T(xr, i + j);                                                  \
                part[j] += f * f;                                                               \
            }                                                                                   \
        for (; i < dim; i++) {                                                                  \
            float f = load_##T(xr, i);                                                          \
            part[0] += f * f;                                                                   \
        }                                                                                       \
        float ss = 0.f;                                                                         \
        for (int j = 0; j < LANES; j++) ss += part[j];                                          \
        /* rsqrt as torch computes it: a rounded sqrt, then a rounded division */               \
        volatile float root = sqrtf(ss / (float)dim + eps);                                     \
        float inv = 1.f / root;                                                                 \
        for (int k = 0; k < dim; k++)                                                           \
            store_##T(o, k, load_##T(w, k) * round_##T(load_##T(xr, k) * inv));                \
    }                                                                                           \
}                                                                                               \
                                                                                                \
/* Rotary embedding in place (HF rotate_half): the first `heads` heads of each row of x        \
   (rows every `stride` elements, heads of d contiguous) rotated by the angles of the row's    \
   position, from the cos/sin tables ([positions, d], T). x*cos, rotated*sin and their sum     \
   each rounded to T, as torch's three ops. */                                                 \
static void rope_##T(T *x, int64_t stride, const int64_t *pos, const T *cos_t,                 \
                     const T *sin_t, int64_t rows, int heads, int d) {                         \
    const int half = d / 2;                                                                     \
    _Pragma("omp parallel for schedule(static) if (rows * heads * d >= 16384)")              \
    for (int64_t r = 0; r < rows; r++) {                                                       \
        const T *c = cos_t + pos[r] * d, *s = sin_t + pos[r] * d;                              \
        for (int h = 0; h < heads; h++) {                                                       \
            T *xh = x + r * stride + (int64_t)h * d;                                           \
            float lo[512], hi[512];                                                             \
            for (int i = 0; i < half; i++) {                                                    \
                lo[i] = load_##T(xh, i);                                                        \
                hi[i] = load_##T(xh, half + i);                                                 \
            }                                                                                   \
            for (int i = 0; i < half; i++) {                                                    \
                float a = round_##T(lo[i] * load_##T(c, i));                                    \
                float b = round_##T(-hi[i] * load_##T(s, i));                                   \
                store_##T(xh, i, a + b);                                                        \
                a = round_##T(hi[i] * load_##T(c, half + i));                                   \
                b = round_##T(lo[i] * load_##T(s, half + i));                                   \
                store_##T(xh, half + i, a + b);                                                 \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}

OPS(float)
OPS(uint16_t)

/* The entry points: is_bf16 picks the element type (bf16 or float32). */
void add_rmsnorm(void *x, int64_t x_stride, const void *delta, int64_t d_stride, const void *w,
                 void *out, int64_t rows, int dim, float eps, int is_bf16) {
    if (is_bf16)
        add_rmsnorm_uint16_t(x, x_stride, delta, d_stride, w, out, rows, dim, eps);
    else
        add_rmsnorm_float(x, x_stride, delta, d_stride, w, out, rows, dim, eps);
}

void rope(void *x, int64_t stride, const int64_t *pos, const void *cos_t, const void *sin_t,
          int64_t rows, int heads, int d, int is_bf16) {
    if (is_bf16) rope_uint16_t(x, stride, pos, cos_t, sin_t, rows, heads, d);
    else rope_float(x, stride, pos, cos_t, sin_t, rows, heads, d);
}
