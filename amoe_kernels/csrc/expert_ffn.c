/* Grouped SwiGLU expert FFN for the small row counts of an expert rank's step, fp32 on CPU.

   An AEP expert step runs a few experts with a few rows each. There MKL's GEMMs (through
   torch._grouped_mm or one call per expert) cost more in per-call work than in arithmetic:
   4 experts x 4 rows of a 128x256 expert took 160 us, for 3 MFLOP. Here one call does the whole
   step: per expert, tiles of up to three rows by four outputs (rows_dot.h), each output a dot
   product over the weight row as stored ([F, D] for w1/w3, [D, F] for w2), so no weight is
   transposed or copied.

   Every row is computed by the same instruction sequence whichever rows share its step (its
   sums never mix with another row's), so a token's expert output does not depend on how the
   scheduler batched it: AEP and lockstep stay token-identical to each other.
   Weights fp32, or bf16 at rest (amoe_grouped_swiglu_bf16w: widened in registers, fp32 compute,
   half the bytes read and no widened copy, where upcast.py copies each expert to fp32 first).
   Legend: T rows (sorted by group), D hidden, F expert ffn, G groups, E stacked experts.
   Layouts (contiguous; x, scratch, y fp32): x [T, D]; w1, w3 [E, F, D]; w2 [E, D, F]; counts [G], experts [G]
   int64 (group g: the next counts[g] rows, weights experts[g]); scratch [T, F]; y [T, D].
   Returns 0, or -1 for an expert index out of range, counts that do not sum to T, or D or F not
   a multiple of 8 (nothing is written then). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "vec_math.h"

/* Eight weights as fp32: stored fp32 (vec_math.h load_f32), or bf16 widened in registers (the upper half of an fp32),
   so bf16 experts at rest are read at half the bytes and never copied. */
static inline __m256 load_bf16(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

#define ROWS_DOT rows_dot_f32
#define WEIGHT_T float
#define LOAD_W load_f32
#include "rows_dot.h"

#define ROWS_DOT rows_dot_bf16
#define WEIGHT_T uint16_t
#define LOAD_W load_bf16
#include "rows_dot.h"

/* a <- silu(a) * b = a / (1 + e^-a) * b, n floats (a multiple of 8). */
static void swiglu(float *a, const float *b, int64_t n)
{
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 g = _mm256_loadu_ps(a + i);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(b + i)));
    }
}

static int grouped_swiglu(const float *x, int64_t T, int64_t D, int64_t F, const void *w1, const void *w3,
                          const void *w2, int bf16, int64_t E, const int64_t *counts, const int64_t *experts, int64_t G,
                            float *h1, float *h3, float *y)
{
    if (D % 8 || F % 8 || D < 8 || F < 8)
        return -1;
    int64_t total = 0;
    for (int64_t g = 0; g < G; g++) {
        if (counts[g] < 0 || experts[g] < 0 || experts[g] >= E)
            return -1;
        total += counts[g];
    }
    if (total != T)
        return -1;
    int64_t r0 = 0;
    for (int64_t g = 0; g < G; g++) {
        const int64_t n = counts[g], e = experts[g];
        if (n == 0)
            continue;
        const float *xg = x + r0 * D;
        if (bf16) {
            rows_dot_bf16(xg, n, (const uint16_t *)w1 + e * F * D, F, D, h1 + r0 * F, F);
            rows_dot_bf16(xg, n, (const uint16_t *)w3 + e * F * D, F, D, h3 + r0 * F, F);
        } else {
            rows_dot_f32(xg, n, (const float *)w1 + e * F * D, F, D, h1 + r0 * F, F);
            rows_dot_f32(xg, n, (const float *)w3 + e * F * D, F, D, h3 + r0 * F, F);
        }
        swiglu(h1 + r0 * F, h3 + r0 * F, n * F);
        if (bf16)
            rows_dot_bf16(h1 + r0 * F, n, (const uint16_t *)w2 + e * D * F, D, F, y + r0 * D, D);
        else
            rows_dot_f32(h1 + r0 * F, n, (const float *)w2 + e * D * F, D, F, y + r0 * D, D);
        r0 += n;
    }
    return 0;
}

int amoe_grouped_swiglu_f32(const float *x, int64_t T, int64_t D, int64_t F, const float *w1, const float *w3,
                            const float *w2, int64_t E, const int64_t *counts, const int64_t *experts, int64_t G,
                            float *h1, float *h3, float *y)
{
    return grouped_swiglu(x, T, D, F, w1, w3, w2, 0, E, counts, experts, G, h1, h3, y);
}

/* The same with bf16 weights (uint16 bit patterns) and fp32 rows: fp32 compute on the widened
   weights, as upcast.py defines it. */
int amoe_grouped_swiglu_bf16w(const float *x, int64_t T, int64_t D, int64_t F, const uint16_t *w1,
                              const uint16_t *w3, const uint16_t *w2, int64_t E, const int64_t *counts,
                              const int64_t *experts, int64_t G, float *h1, float *h3, float *y)
{
    return grouped_swiglu(x, T, D, F, w1, w3, w2, 1, E, counts, experts, G, h1, h3, y);
}

#else
int amoe_grouped_swiglu_f32(const float *x, int64_t T, int64_t D, int64_t F, const float *w1, const float *w3,
                            const float *w2, int64_t E, const int64_t *counts, const int64_t *experts, int64_t G,
                            float *h1, float *h3, float *y)
{
    (void)x; (void)T; (void)D; (void)F; (void)w1; (void)w3; (void)w2; (void)E; (void)counts; (void)experts;
    (void)G; (void)h1; (void)h3; (void)y;
    return -2; /* no AVX2/FMA: the caller keeps the PyTorch path */
}
int amoe_grouped_swiglu_bf16w(const float *x, int64_t T, int64_t D, int64_t F, const uint16_t *w1,
                              const uint16_t *w3, const uint16_t *w2, int64_t E, const int64_t *counts,
                              const int64_t *experts, int64_t G, float *h1, float *h3, float *y)
{
    return amoe_grouped_swiglu_f32(x, T, D, F, (const float *)w1, (const float *)w3, (const float *)w2, E, counts,
                                   experts, G, h1, h3, y);
}
#endif
