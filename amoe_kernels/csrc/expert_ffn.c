/* Grouped SwiGLU expert FFN for the small row counts of an expert rank's step, fp32 on CPU.

   An AEP expert step runs a few experts with a few rows each. There MKL's GEMMs (through
   torch._grouped_mm or one call per expert) cost more in per-call work than in arithmetic:
   4 experts x 4 rows of a 128x256 expert took 160 us, for 3 MFLOP. Here one call does the whole
   step: per expert, two rows by four outputs at a time, each output a dot product over the
   weight row as stored ([F, D] for w1/w3, [D, F] for w2), so no weight is transposed or copied.

   Every row is computed by the same instruction sequence whichever rows share its step (its
   sums never mix with another row's), so a token's expert output does not depend on how the
   scheduler batched it: AEP and lockstep stay token-identical to each other.
   Legend: T rows (sorted by group), D hidden, F expert ffn, G groups, E stacked experts.
   Layouts (contiguous fp32): x [T, D]; w1, w3 [E, F, D]; w2 [E, D, F]; counts [G], experts [G]
   int64 (group g: the next counts[g] rows, weights experts[g]); scratch [T, F]; y [T, D].
   Returns 0, or -1 for an expert index out of range, counts that do not sum to T, or D or F not
   a multiple of 8 (nothing is written then). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "vec_math.h"

static inline float hsum(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[r, o] = x_r . w_o for rows r of x (n of them, K floats each) and outputs o of w (O rows of
   K floats): three rows by four outputs per tile, then two, then one, one accumulator each.
   Every accumulator sums its row's products in the same order in every tile, so a row's result
   does not depend on the tile it fell in. */
static void rows_dot(const float *x, int64_t n, const float *w, int64_t O, int64_t K, float *out, int64_t ld)
{
    int64_t r = 0;
    for (; r + 3 <= n; r += 3) {
        const float *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K;
        for (int64_t o = 0; o < O; o += 4) {
            const float *w0 = w + o * K;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
            for (int64_t i = 0; i < K; i += 8) {
                const __m256 u = _mm256_loadu_ps(x0 + i), v = _mm256_loadu_ps(x1 + i), z = _mm256_loadu_ps(x2 + i);
                __m256 b = _mm256_loadu_ps(w0 + i);
                a00 = _mm256_fmadd_ps(u, b, a00); a10 = _mm256_fmadd_ps(v, b, a10); a20 = _mm256_fmadd_ps(z, b, a20);
                b = _mm256_loadu_ps(w0 + K + i);
                a01 = _mm256_fmadd_ps(u, b, a01); a11 = _mm256_fmadd_ps(v, b, a11); a21 = _mm256_fmadd_ps(z, b, a21);
                b = _mm256_loadu_ps(w0 + 2 * K + i);
                a02 = _mm256_fmadd_ps(u, b, a02); a12 = _mm256_fmadd_ps(v, b, a12); a22 = _mm256_fmadd_ps(z, b, a22);
                b = _mm256_loadu_ps(w0 + 3 * K + i);
                a03 = _mm256_fmadd_ps(u, b, a03); a13 = _mm256_fmadd_ps(v, b, a13); a23 = _mm256_fmadd_ps(z, b, a23);
            }
            float *o0 = out + r * ld + o, *o1 = o0 + ld, *o2 = o1 + ld;
            o0[0] = hsum(a00); o0[1] = hsum(a01); o0[2] = hsum(a02); o0[3] = hsum(a03);
            o1[0] = hsum(a10); o1[1] = hsum(a11); o1[2] = hsum(a12); o1[3] = hsum(a13);
            o2[0] = hsum(a20); o2[1] = hsum(a21); o2[2] = hsum(a22); o2[3] = hsum(a23);
        }
    }
    for (; r + 2 <= n; r += 2) {
        const float *x0 = x + r * K, *x1 = x0 + K;
        for (int64_t o = 0; o < O; o += 4) {
            const float *w0 = w + o * K;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
            for (int64_t i = 0; i < K; i += 8) {
                const __m256 u = _mm256_loadu_ps(x0 + i), v = _mm256_loadu_ps(x1 + i);
                const __m256 b0 = _mm256_loadu_ps(w0 + i), b1 = _mm256_loadu_ps(w0 + K + i);
                const __m256 b2 = _mm256_loadu_ps(w0 + 2 * K + i), b3 = _mm256_loadu_ps(w0 + 3 * K + i);
                a00 = _mm256_fmadd_ps(u, b0, a00);
                a01 = _mm256_fmadd_ps(u, b1, a01);
                a02 = _mm256_fmadd_ps(u, b2, a02);
                a03 = _mm256_fmadd_ps(u, b3, a03);
                a10 = _mm256_fmadd_ps(v, b0, a10);
                a11 = _mm256_fmadd_ps(v, b1, a11);
                a12 = _mm256_fmadd_ps(v, b2, a12);
                a13 = _mm256_fmadd_ps(v, b3, a13);
            }
            float *o0 = out + r * ld + o, *o1 = o0 + ld;
            o0[0] = hsum(a00); o0[1] = hsum(a01); o0[2] = hsum(a02); o0[3] = hsum(a03);
            o1[0] = hsum(a10); o1[1] = hsum(a11); o1[2] = hsum(a12); o1[3] = hsum(a13);
        }
    }
    for (; r < n; r++) {
        const float *x0 = x + r * K;
        for (int64_t o = 0; o < O; o += 4) {
            const float *w0 = w + o * K;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
            for (int64_t i = 0; i < K; i += 8) {
                const __m256 u = _mm256_loadu_ps(x0 + i);
                a00 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + i), a00);
                a01 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + K + i), a01);
                a02 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + 2 * K + i), a02);
                a03 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + 3 * K + i), a03);
            }
            float *o0 = out + r * ld + o;
            o0[0] = hsum(a00); o0[1] = hsum(a01); o0[2] = hsum(a02); o0[3] = hsum(a03);
        }
    }
}

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

int amoe_grouped_swiglu_f32(const float *x, int64_t T, int64_t D, int64_t F, const float *w1, const float *w3,
                            const float *w2, int64_t E, const int64_t *counts, const int64_t *experts, int64_t G,
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
        rows_dot(xg, n, w1 + e * F * D, F, D, h1 + r0 * F, F);
        rows_dot(xg, n, w3 + e * F * D, F, D, h3 + r0 * F, F);
        swiglu(h1 + r0 * F, h3 + r0 * F, n * F);
        rows_dot(h1 + r0 * F, n, w2 + e * D * F, D, F, y + r0 * D, D);
        r0 += n;
    }
    return 0;
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
#endif
