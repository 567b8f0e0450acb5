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

/* One (sequence, KV head): D is a compile-time constant in the specialised copies below, so the
   per-position dot products and the output rows stay in vector registers. */
static inline void attend_one(const float *qg, const float *k, const float *v, const int64_t *table,
                              int64_t L, int64_t bs, int64_t row, int64_t rep, const int64_t D,
                              float scale, float *p, float *og)
{
    for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const float *kb = k + table[t0 / bs] * bs * row;
        const int64_t n = L - t0 < bs ? L - t0 : bs;
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

int amoe_paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                          int64_t M, const int64_t *lens, int64_t S, int64_t H, int64_t G, int64_t d,
                          int64_t bs, int64_t N, float scale, float *out)
{
    const int64_t rep = G > 0 ? H / G : 0;
    if (rep < 1 || rep > MAX_REP || rep * G != H || d < 1 || d > MAX_D || bs < 1)
        return -1;
    int64_t Lmax = 0;
    for (int64_t s = 0; s < S; s++) {
        if (lens[s] < 1 || lens[s] > M * bs)
            return -1;
        Lmax = lens[s] > Lmax ? lens[s] : Lmax;
    }
    for (int64_t i = 0; i < S * M; i++)
        if (tables[i] < 0 || tables[i] >= N)
            return -1;
    float *p = malloc(sizeof(float) * (size_t)(rep * Lmax)); /* scores, then probabilities */
    if (!p)
        return -1;
    const int64_t row = G * d; /* floats per cache position */
    for (int64_t s = 0; s < S; s++) {
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + (s * H + g * rep) * d;
            float *og = out + (s * H + g * rep) * d;
            const float *kg = k + g * d, *vg = v + g * d;
            const int64_t *table = tables + s * M;
            switch (d) {
            case 16: attend_d16(qg, kg, vg, table, lens[s], bs, row, rep, scale, p, og); break;
            case 32: attend_d32(qg, kg, vg, table, lens[s], bs, row, rep, scale, p, og); break;
            case 64: attend_d64(qg, kg, vg, table, lens[s], bs, row, rep, scale, p, og); break;
            case 128: attend_d128(qg, kg, vg, table, lens[s], bs, row, rep, scale, p, og); break;
            default: attend_one(qg, kg, vg, table, lens[s], bs, row, rep, d, scale, p, og);
            }
        }
    }
    free(p);
    return 0;
}
