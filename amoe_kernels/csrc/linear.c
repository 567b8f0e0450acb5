/* y [T, O] = x [T, D] w [O, D]^T in fp32 on CPU: the attention side's projections, router and
   LM head (w as stored, [O, D], as F.linear takes it).

   MKL's sgemm packs w into its own layout on every call. At the attention rank's row counts
   (a wave: 1-64 tokens) that copy was a fifth of the LM head's time (32000 x 1024), and the
   packing does not pay back over so few rows. Here each output is a dot product over the
   stored weight row (rows_dot.h: register tiles of rows x outputs, the weights read from memory
   once per call). Each output's products are summed in the same order whatever T is and
   whichever tile it falls in, so a token's numbers do not depend on the batch it was in: AEP's
   waves and lockstep's one batch give the same bits.
   amoe_set_linear_threads(n) lets a process split the outputs of a large call over n threads
   (an attention rank whose expert ranks wait while it works: one wave on CPU); the split is by
   whole outputs, so the bits do not change with it. paged_decode.c splits a large decode
   attention call by sequences over the same count.
   Returns 0, or -1 when D is not a multiple of 8 (nothing written); -2 without AVX2/FMA. */

#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "vec_math.h"


#define ROWS_DOT rows_dot_f32
#define WEIGHT_T float
#define LOAD_W load_f32
#include "rows_dot.h"

#include "run_parts.h"

static int linear_threads = 1;

void amoe_set_linear_threads(int n) { linear_threads = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n; }
int amoe_get_linear_threads(void) { return linear_threads; }

/* Outputs [o0, o1) of y [T, O]. */
struct part {
    const float *x, *w;
    int64_t T, D, O, o0, o1;
    float *y;
};

static void linear_part(const struct part *p)
{
    const int64_t T = p->T, D = p->D, O = p->O, o4 = p->o0 + ((p->o1 - p->o0) & ~(int64_t)3);
    if (o4 > p->o0)
        rows_dot_f32(p->x, T, p->w + p->o0 * D, o4 - p->o0, D, p->y + p->o0, O);
    /* Outputs past the last multiple of 4: one accumulator each, summed as a tile's are. */
    for (int64_t o = o4; o < p->o1; o++)
        for (int64_t r = 0; r < T; r++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(p->x + r * D + i), _mm256_loadu_ps(p->w + o * D + i), a);
            p->y[r * O + o] = hsum(a);
        }
}

static void *linear_worker(void *arg)
{
    linear_part(arg);
    return NULL;
}

int amoe_linear_f32(const float *x, int64_t T, int64_t D, const float *w, int64_t O, float *y)
{
    if (D % 8 || D < 8 || T < 0 || O < 0)
        return -1;
    /* A thread costs ~30-50 µs to start and join here: split only calls of 4M multiply-adds
       (~100 µs) and more, in parts of whole 4-output tiles. */
    int64_t n = linear_threads;
    if (T * D * O < ((int64_t)1 << 22))
        n = 1;
    if (n > O / 4)
        n = O / 4 > 0 ? O / 4 : 1;
    struct part parts[MAX_THREADS];
    const int64_t per = (O / 4 + n - 1) / n * 4;
    for (int64_t i = 0; i < n; i++) {
        const int64_t o0 = i * per < O ? i * per : O, o1 = (i + 1) * per < O && i + 1 < n ? (i + 1) * per : O;
        parts[i] = (struct part){x, w, T, D, O, o0, o1, y};
    }
    run_parts(linear_worker, parts, sizeof(parts[0]), n);
    return 0;
}

#else
void amoe_set_linear_threads(int n) { (void)n; }
int amoe_get_linear_threads(void) { return 1; }
int amoe_linear_f32(const float *x, int64_t T, int64_t D, const float *w, int64_t O, float *y)
{
    (void)x; (void)T; (void)D; (void)w; (void)O; (void)y;
    return -2; /* no AVX2/FMA: the caller keeps F.linear */
}
#endif
