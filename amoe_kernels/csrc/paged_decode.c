/* Decode attention over a paged KV cache on CPU, reading K/V blocks where they lie.

   The PyTorch reference (reference.paged_attention) gathers every sequence's whole context into
   a dense copy for each block of each step (two index_selects), then runs two batched GEMMs, a
   mask and a softmax: most of its time is the copy and the per-op host cost. Here one call does
   a whole batch: per (sequence, KV head), the rep = H / G query heads that share the KV head are
   scored against each position's key as it is read, softmaxed in fp32 and applied to the values,
   again read in place.

   Legend: S sequences, H query heads, G KV heads, d head dim, N cache blocks, bs block size,
   M table columns, L context length of a sequence (lens[s]), rep = H / G.
   Layouts (contiguous, fp32): q [S, H, d]; k, v [N, bs, G, d]; tables [S, M] int64; lens [S]
   int64; out [S, H, d]. Returns 0, or -1 when a block id or length is out of range or H is not
   a multiple of G (then out is not written in full; the caller raises). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REP 64
#define MAX_D 256

/* e^x for x <= 0 (scores minus their max), written so the compiler vectorizes it (libm's expf
   is one call per element): 2^(x log2 e) = 2^i * 2^f with i = round(.), f in [-1/2, 1/2], 2^f by
   a degree-6 Chebyshev fit (relative error 1e-7, about one fp32 ulp). */
static inline float exp_nonpos(float x)
{
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.4426950408889634f;
    const float fi = rintf(t);
    const float f = t - fi;
    float p = 1.5465317883e-04f;
    p = p * f + 1.3395285364e-03f;
    p = p * f + 9.6180399298e-03f;
    p = p * f + 5.5503406681e-02f;
    p = p * f + 2.4022651101e-01f;
    p = p * f + 6.9314720007e-01f;
    p = p * f + 1.0f;
    union { int32_t i; float f; } two_i = { .i = ((int32_t)fi + 127) << 23 };
    return p * two_i.f;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "vec_math.h"

/* The sums of eight 8-lane vectors, lane i of the result being the sum of a[i]'s lanes. */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7)
{
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Scores of one query row against n keys (rows `row` floats apart): eight keys at a time, each
   dot product in its own accumulator, reduced together (one horizontal reduction per eight). */
static inline void scores_row(const float *qr, const float *kb, int64_t n, int64_t row, const int64_t D,
                              float scale, float *out)
{
    int64_t j = 0;
    const __m256 sc = _mm256_set1_ps(scale);
    for (; j + 8 <= n; j += 8) {
        const float *k0 = kb + j * row;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t i = 0; i < D; i += 8) {
            const __m256 qv = _mm256_loadu_ps(qr + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + row + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * row + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * row + i), a3);
            a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 4 * row + i), a4);
            a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 5 * row + i), a5);
            a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 6 * row + i), a6);
            a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 7 * row + i), a7);
        }
        _mm256_storeu_ps(out + j, _mm256_mul_ps(hsum8(a0, a1, a2, a3, a4, a5, a6, a7), sc));
    }
    for (; j < n; j++) {
        const float *kt = kb + j * row;
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < D; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), _mm256_loadu_ps(kt + i), a);
        const __m256 z = _mm256_setzero_ps();
        out[j] = _mm256_cvtss_f32(hsum8(a, z, z, z, z, z, z, z)) * scale;
    }
}

/* out_D = sum_j p[j] v_j over n values: two sets of accumulators (even and odd positions), so
   consecutive FMAs do not wait on each other, for four 8-lane chunks of D at once (eight
   independent chains instead of two). Every element is summed in the same order whatever the
   chunking. */
static inline void weighted_rows(const float *pr, const float *vb, int64_t n, int64_t row, const int64_t D,
                                 float *acc)
{
    int64_t i = 0;
    for (; i + 32 <= D; i += 32) {
        __m256 e0 = _mm256_loadu_ps(acc + i), e1 = _mm256_loadu_ps(acc + i + 8);
        __m256 e2 = _mm256_loadu_ps(acc + i + 16), e3 = _mm256_loadu_ps(acc + i + 24);
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            const __m256 pe = _mm256_set1_ps(pr[j]), po = _mm256_set1_ps(pr[j + 1]);
            const float *ve = vb + j * row + i, *vo = ve + row;
            e0 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve), e0);
            e1 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve + 8), e1);
            e2 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve + 16), e2);
            e3 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve + 24), e3);
            o0 = _mm256_fmadd_ps(po, _mm256_loadu_ps(vo), o0);
            o1 = _mm256_fmadd_ps(po, _mm256_loadu_ps(vo + 8), o1);
            o2 = _mm256_fmadd_ps(po, _mm256_loadu_ps(vo + 16), o2);
            o3 = _mm256_fmadd_ps(po, _mm256_loadu_ps(vo + 24), o3);
        }
        if (j < n) {
            const __m256 pe = _mm256_set1_ps(pr[j]);
            const float *ve = vb + j * row + i;
            e0 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve), e0);
            e1 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve + 8), e1);
            e2 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve + 16), e2);
            e3 = _mm256_fmadd_ps(pe, _mm256_loadu_ps(ve + 24), e3);
        }
        _mm256_storeu_ps(acc + i, _mm256_add_ps(e0, o0));
        _mm256_storeu_ps(acc + i + 8, _mm256_add_ps(e1, o1));
        _mm256_storeu_ps(acc + i + 16, _mm256_add_ps(e2, o2));
        _mm256_storeu_ps(acc + i + 24, _mm256_add_ps(e3, o3));
    }
    for (; i < D; i += 8) {
        __m256 e = _mm256_loadu_ps(acc + i), o = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            e = _mm256_fmadd_ps(_mm256_set1_ps(pr[j]), _mm256_loadu_ps(vb + j * row + i), e);
            o = _mm256_fmadd_ps(_mm256_set1_ps(pr[j + 1]), _mm256_loadu_ps(vb + (j + 1) * row + i), o);
        }
        if (j < n)
            e = _mm256_fmadd_ps(_mm256_set1_ps(pr[j]), _mm256_loadu_ps(vb + j * row + i), e);
        _mm256_storeu_ps(acc + i, _mm256_add_ps(e, o));
    }
}

static inline float hmax8(__m256 a)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* In place: pr[0..L) <- softmax(pr), eight lanes at a time (the scalar loop the compiler left
   unvectorized was a third of the kernel). */
static inline void softmax_row(float *pr, int64_t L)
{
    int64_t t = 0;
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= L; t += 8)
        m8 = _mm256_max_ps(m8, _mm256_loadu_ps(pr + t));
    float mx = hmax8(m8);
    for (; t < L; t++)
        mx = pr[t] > mx ? pr[t] : mx;
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 s8 = _mm256_setzero_ps();
    for (t = 0; t + 8 <= L; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(pr + t), mv));
        _mm256_storeu_ps(pr + t, e);
        s8 = _mm256_add_ps(s8, e);
    }
    const __m256 z = _mm256_setzero_ps();
    float sum = _mm256_cvtss_f32(hsum8(s8, z, z, z, z, z, z, z));
    for (; t < L; t++) {
        pr[t] = exp_nonpos(pr[t] - mx);
        sum += pr[t];
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (t = 0; t + 8 <= L; t += 8)
        _mm256_storeu_ps(pr + t, _mm256_mul_ps(_mm256_loadu_ps(pr + t), inv));
    for (; t < L; t++)
        pr[t] *= 1.f / sum;
}
#define HAVE_SOFTMAX_ROW 1
#define VECTOR_D(D) ((D) % 8 == 0)
#else
#define VECTOR_D(D) 0
static inline void scores_row(const float *qr, const float *kb, int64_t n, int64_t row, const int64_t D,
                              float scale, float *out) { (void)qr; (void)kb; (void)n; (void)row; (void)D;
                              (void)scale; (void)out; }
static inline void weighted_rows(const float *pr, const float *vb, int64_t n, int64_t row, const int64_t D,
                                 float *acc) { (void)pr; (void)vb; (void)n; (void)row; (void)D; (void)acc; }
#endif

/* Towards the cache: one KV head's D floats (base: the head's offset in k or v) at each position
   of the cache block after the one at t0, if the context goes on; it lies elsewhere, where the
   hardware prefetcher cannot know to look. */
static inline void prefetch_next_block(const float *base, const int64_t *table, int64_t t0, int64_t L, int64_t bs,
                                       int64_t row, const int64_t D)
{
    if (t0 + bs >= L)
        return;
    const float *b = base + table[t0 / bs + 1] * bs * row;
    const int64_t n = L - t0 - bs < bs ? L - t0 - bs : bs;
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < D; i += 16)
            __builtin_prefetch(b + j * row + i, 0, 3);
}

/* One (sequence, KV head): D is a compile-time constant in the specialised copies below, so the
   per-position dot products and the output rows stay in vector registers. With AVX2 and D a
   multiple of 8, the scores go eight positions at a time through scores_row and the values
   through weighted_rows; otherwise plain loops that the compiler vectorizes. */
static inline void attend_one(const float *qg, const float *k, const float *v, const int64_t *table,
                              int64_t L, int64_t bs, int64_t row, int64_t rep, const int64_t D,
                              float scale, float *p, float *og)
{
    for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const float *kb = k + table[t0 / bs] * bs * row;
        const int64_t n = L - t0 < bs ? L - t0 : bs;
        prefetch_next_block(k, table, t0, L, bs, row, D);
        if (VECTOR_D(D)) {
            for (int64_t r = 0; r < rep; r++)
                scores_row(qg + r * D, kb, n, row, D, scale, p + r * L + t0);
            continue;
        }
        for (int64_t j = 0; j < n; j++) {
            const float *kt = kb + j * row;
            for (int64_t r = 0; r < rep; r++) {
                const float *qr = qg + r * D;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int64_t i = 0; i < D; i++)
                    acc += qr[i] * kt[i];
                p[r * L + t0 + j] = acc * scale;
            }
        }
    }
    for (int64_t r = 0; r < rep; r++) {
        float *pr = p + r * L;
#ifdef HAVE_SOFTMAX_ROW
        softmax_row(pr, L);
        continue;
#endif
        float mx = -INFINITY;
        for (int64_t t = 0; t < L; t++)
            mx = pr[t] > mx ? pr[t] : mx;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; t++) {
            pr[t] = exp_nonpos(pr[t] - mx);
            sum += pr[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < L; t++)
            pr[t] *= inv;
    }
    for (int64_t r = 0; r < rep; r++) {
        const float *pr = p + r * L;
        float acc[MAX_D];
        for (int64_t i = 0; i < D; i++)
            acc[i] = 0.f;
        for (int64_t t0 = 0; t0 < L; t0 += bs) {
            const float *vb = v + table[t0 / bs] * bs * row;
            const int64_t n = L - t0 < bs ? L - t0 : bs;
            prefetch_next_block(v, table, t0, L, bs, row, D);
            if (VECTOR_D(D)) {
                weighted_rows(pr + t0, vb, n, row, D, acc);
                continue;
            }
            for (int64_t j = 0; j < n; j++) {
                const float w = pr[t0 + j];
                const float *vt = vb + j * row;
#pragma omp simd
                for (int64_t i = 0; i < D; i++)
                    acc[i] += w * vt[i];
            }
        }
        memcpy(og + r * D, acc, sizeof(float) * (size_t)D);
    }
}

#define SPECIALISE(DIM)                                                                            \
    static void attend_d##DIM(const float *qg, const float *k, const float *v, const int64_t *table, \
                              int64_t L, int64_t bs, int64_t row, int64_t rep, float scale, float *p, \
                              float *og)                                                           \
    {                                                                                              \
        attend_one(qg, k, v, table, L, bs, row, rep, DIM, scale, p, og);                           \
    }
SPECIALISE(16)
SPECIALISE(32)
SPECIALISE(64)
SPECIALISE(128)

/* Sequences [s0, s1) of a call (a thread's share). */
struct decode_part {
    const float *q, *k, *v;
    const int64_t *tables, *lens;
    int64_t M, H, G, d, bs, s0, s1;
    float scale;
    float *out;
    int rc;
};

static void decode_range(struct decode_part *a)
{
    const int64_t H = a->H, G = a->G, d = a->d, M = a->M, rep = H / G, row = G * d; /* floats per position */
    int64_t Lmax = 0;
    for (int64_t s = a->s0; s < a->s1; s++)
        Lmax = a->lens[s] > Lmax ? a->lens[s] : Lmax;
    float *p = malloc(sizeof(float) * (size_t)(rep * (Lmax > 0 ? Lmax : 1))); /* scores, then probabilities */
    a->rc = p ? 0 : -1;
    if (!p)
        return;
    for (int64_t s = a->s0; s < a->s1; s++) {
        for (int64_t g = 0; g < G; g++) {
            const float *qg = a->q + (s * H + g * rep) * d;
            float *og = a->out + (s * H + g * rep) * d;
            const float *kg = a->k + g * d, *vg = a->v + g * d;
            const int64_t *table = a->tables + s * M, L = a->lens[s];
            switch (d) {
            case 16: attend_d16(qg, kg, vg, table, L, a->bs, row, rep, a->scale, p, og); break;
            case 32: attend_d32(qg, kg, vg, table, L, a->bs, row, rep, a->scale, p, og); break;
            case 64: attend_d64(qg, kg, vg, table, L, a->bs, row, rep, a->scale, p, og); break;
            case 128: attend_d128(qg, kg, vg, table, L, a->bs, row, rep, a->scale, p, og); break;
            default: attend_one(qg, kg, vg, table, L, a->bs, row, rep, d, a->scale, p, og);
            }
        }
    }
    free(p);
}

static void *decode_worker(void *arg)
{
    decode_range(arg);
    return NULL;
}

#include "run_parts.h"

/* The attention rank's threads (amoe_set_linear_threads) split a large call by whole sequences,
   balanced by context length; each (sequence, KV head) is computed as alone, so the bits do not
   depend on the split. The kernel mostly waits on its KV loads (perf; the bench model reads 16 MB
   of cache per block), and two cores load about twice what one does. */
int amoe_paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                          int64_t M, const int64_t *lens, int64_t S, int64_t H, int64_t G, int64_t d,
                          int64_t bs, int64_t N, float scale, float *out)
{
    const int64_t rep = G > 0 ? H / G : 0;
    if (rep < 1 || rep > MAX_REP || rep * G != H || d < 1 || d > MAX_D || bs < 1)
        return -1;
    int64_t total = 0;
    for (int64_t s = 0; s < S; s++) {
        if (lens[s] < 1 || lens[s] > M * bs)
            return -1;
        total += lens[s];
    }
    for (int64_t i = 0; i < S * M; i++)
        if (tables[i] < 0 || tables[i] >= N)
            return -1;
    /* A thread costs ~30-50 µs to start and join: split only from 2M multiply-adds per QK or PV. */
    int64_t n = amoe_get_linear_threads();
    if (total * H * d < ((int64_t)1 << 21))
        n = 1;
    n = n > S ? S : n;
    n = n > MAX_THREADS ? MAX_THREADS : n < 1 ? 1 : n;
    struct decode_part parts[MAX_THREADS];
    int64_t s = 0, cum = 0;
    for (int64_t i = 0; i < n; i++) { /* part i ends where the context sum passes (i + 1) / n of it */
        const int64_t s0 = s;
        while (s < S && (i == n - 1 || cum * n < total * (i + 1)))
            cum += lens[s++];
        parts[i] = (struct decode_part){q, k, v, tables, lens, M, H, G, d, bs, s0, s, scale, out, 0};
    }
    run_parts(decode_worker, parts, sizeof(parts[0]), n);
    int rc = 0;
    for (int64_t i = 0; i < n; i++)
        rc |= parts[i].rc;
    return rc ? -1 : 0;
}
