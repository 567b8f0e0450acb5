/* The body of rows_dot, included once per weight type by expert_ffn.c with ROWS_DOT (the
   function's name), WEIGHT_T (the weights' element type) and LOAD_W (eight weights as fp32)
   defined; no include guard on purpose. */

/* out[r, o] = x_r . w_o for rows r of x (n of them, K floats each) and outputs o of w (O rows of
   K floats): three rows by four outputs per tile, then two (two tiles of two where one row would
   be left: a one-row tile loads more than it multiplies), then one, one accumulator each.
   Every accumulator sums its row's products in the same order in every tile, so a row's result
   does not depend on the tile it fell in (nor on the order the tiles run in).
   The outputs go in blocks of weight rows that stay in L2 while every row tile passes over
   them: the weights are read from memory once per call, not once per three rows (a 1024 x 2816
   expert is 11.5 MB; with the row tiles outermost, 8 rows read it three times).
   An expert's weights are usually not in cache (a rank's experts over all blocks outgrow the
   L3), and the hardware prefetcher alone left the cold reads un-overlapped: every pass over a
   block prefetches a share of the next block, so its reads overlap this block's arithmetic. */
#ifndef PREFETCH_NEXT
#define PF_ROWS 32
/* Pins an operand in a register here. A 3 x 4 tile needs all 16 ymm registers (12 sums, 3 rows,
   1 weight vector), and without the pin GCC folds the loads into the FMAs instead: every weight
   vector loaded three times (or every row four), 15 loads per 12 FMAs, which made the loop
   load-bound at 55-65% of the FMA peak (pinned: 7 loads; 1.1-1.3x at 16-64 rows, measured with
   python -m amoe_kernels.bench_native). */
#define KEEP(v) __asm__("" : "+x"(v))
/* Weights that fit L2, or one pass: the first pass's own reads are the stream; each of its
   tiles prefetches the tile PF_ROWS rows ahead, two lines per 8-wide step i (a prefetch past
   the weights' end never faults). */
#define PREFETCH_AHEAD(w0, K, i)                                                                  \
    do {                                                                                          \
        _mm_prefetch((const char *)((w0) + PF_ROWS * (K) + 4 * (i)), _MM_HINT_T0);                 \
        _mm_prefetch((const char *)((w0) + PF_ROWS * (K) + 4 * (i) + 16), _MM_HINT_T0);            \
    } while (0)
/* Larger weights and several passes: the next weight block, L lines spread evenly over this
   block's S inner steps of every pass (acc carries the fraction), so those reads run beside this
   block's arithmetic instead of stalling its first pass (8 rows of a 1024 x 2816 expert: 1.3x). */
#define PREFETCH_NEXT()                                                                           \
    do {                                                                                          \
        for (acc += L; acc >= S; acc -= S, pf += 64)                                              \
            _mm_prefetch(pf, _MM_HINT_T0);                                                        \
    } while (0)
/* The inner loop over K with STEP(i) as its body, once per prefetch mode: the mode is fixed for
   a tile's whole loop, so it is chosen outside it rather than tested at every step. */
#define OVER_K(STEP)                                                                              \
    do {                                                                                          \
        if (spread)                                                                               \
            for (int64_t i = 0; i < K; i += 8) {                                                  \
                PREFETCH_NEXT();                                                                  \
                STEP(i);                                                                          \
            }                                                                                     \
        else if (first)                                                                           \
            for (int64_t i = 0; i < K; i += 8) {                                                  \
                PREFETCH_AHEAD(w0, K, i);                                                         \
                STEP(i);                                                                          \
            }                                                                                     \
        else                                                                                      \
            for (int64_t i = 0; i < K; i += 8)                                                    \
                STEP(i);                                                                          \
    } while (0)
/* Weight rows per block: a multiple of 4 whose bytes fit ~192 KB of the 512 KB L2, 4 to 64. */
static inline int64_t rows_dot_block(int64_t row_bytes)
{
    int64_t b = ((int64_t)196608 / row_bytes) & ~(int64_t)3;
    return b < 4 ? 4 : b > 64 ? 64 : b;
}
#endif

/* One 8-wide step of each tile: rows x0..x2 (or x0..x1, x0) against weight rows w0..w0+3K. */
#define STEP3(i)                                                                                  \
    do {                                                                                          \
        __m256 u = _mm256_loadu_ps(x0 + (i)), v = _mm256_loadu_ps(x1 + (i)), z = _mm256_loadu_ps(x2 + (i)); \
        KEEP(u); KEEP(v); KEEP(z);                                                                \
        __m256 b = LOAD_W(w0 + (i));                                                              \
        KEEP(b);                                                                                  \
        a00 = _mm256_fmadd_ps(u, b, a00); a10 = _mm256_fmadd_ps(v, b, a10); a20 = _mm256_fmadd_ps(z, b, a20); \
        b = LOAD_W(w0 + K + (i));                                                                 \
        KEEP(b);                                                                                  \
        a01 = _mm256_fmadd_ps(u, b, a01); a11 = _mm256_fmadd_ps(v, b, a11); a21 = _mm256_fmadd_ps(z, b, a21); \
        b = LOAD_W(w0 + 2 * K + (i));                                                             \
        KEEP(b);                                                                                  \
        a02 = _mm256_fmadd_ps(u, b, a02); a12 = _mm256_fmadd_ps(v, b, a12); a22 = _mm256_fmadd_ps(z, b, a22); \
        b = LOAD_W(w0 + 3 * K + (i));                                                             \
        KEEP(b);                                                                                  \
        a03 = _mm256_fmadd_ps(u, b, a03); a13 = _mm256_fmadd_ps(v, b, a13); a23 = _mm256_fmadd_ps(z, b, a23); \
    } while (0)
#define STEP2(i)                                                                                  \
    do {                                                                                          \
        __m256 u = _mm256_loadu_ps(x0 + (i)), v = _mm256_loadu_ps(x1 + (i));                      \
        __m256 b0 = LOAD_W(w0 + (i)), b1 = LOAD_W(w0 + K + (i));                                  \
        __m256 b2 = LOAD_W(w0 + 2 * K + (i)), b3 = LOAD_W(w0 + 3 * K + (i));                      \
        KEEP(u); KEEP(v); KEEP(b0); KEEP(b1); KEEP(b2); KEEP(b3);                                 \
        a00 = _mm256_fmadd_ps(u, b0, a00); a01 = _mm256_fmadd_ps(u, b1, a01);                     \
        a02 = _mm256_fmadd_ps(u, b2, a02); a03 = _mm256_fmadd_ps(u, b3, a03);                     \
        a10 = _mm256_fmadd_ps(v, b0, a10); a11 = _mm256_fmadd_ps(v, b1, a11);                     \
        a12 = _mm256_fmadd_ps(v, b2, a12); a13 = _mm256_fmadd_ps(v, b3, a13);                     \
    } while (0)
#define STEP1(i)                                                                                  \
    do {                                                                                          \
        const __m256 u = _mm256_loadu_ps(x0 + (i));                                               \
        a00 = _mm256_fmadd_ps(u, LOAD_W(w0 + (i)), a00);                                          \
        a01 = _mm256_fmadd_ps(u, LOAD_W(w0 + K + (i)), a01);                                      \
        a02 = _mm256_fmadd_ps(u, LOAD_W(w0 + 2 * K + (i)), a02);                                  \
        a03 = _mm256_fmadd_ps(u, LOAD_W(w0 + 3 * K + (i)), a03);                                  \
    } while (0)

static void ROWS_DOT(const float *x, int64_t n, const WEIGHT_T *w, int64_t O, int64_t K, float *out, int64_t ld)
{
    const int64_t blk = rows_dot_block(K * (int64_t)sizeof(WEIGHT_T));
    const int64_t tiles = n / 3 + (n % 3 ? 1 : 0); /* row tiles: passes over each block */
    const int spread = tiles > 1 && O * K * (int64_t)sizeof(WEIGHT_T) > ((int64_t)1 << 20);
    for (int64_t ob = 0; ob < O; ob += blk) {
        const int64_t oe = ob + blk < O ? ob + blk : O, next = oe + blk < O ? blk : O - oe;
        const char *pf = (const char *)(w + oe * K);
        const int64_t L = (next * K * (int64_t)sizeof(WEIGHT_T) + 63) / 64, S = tiles * ((oe - ob) / 4) * (K / 8);
        int64_t acc = 0;
        int first = 1;
        int64_t r = 0;
        for (; r + 3 <= n && n - r != 4; r += 3, first = 0) {
            const float *x0 = x + r * K, *x1 = x0 + K, *x2 = x1 + K;
            for (int64_t o = ob; o < oe; o += 4) {
                const WEIGHT_T *w0 = w + o * K;
                __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
                __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
                __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
                OVER_K(STEP3);
                float *o0 = out + r * ld + o, *o1 = o0 + ld, *o2 = o1 + ld;
                o0[0] = hsum(a00); o0[1] = hsum(a01); o0[2] = hsum(a02); o0[3] = hsum(a03);
                o1[0] = hsum(a10); o1[1] = hsum(a11); o1[2] = hsum(a12); o1[3] = hsum(a13);
                o2[0] = hsum(a20); o2[1] = hsum(a21); o2[2] = hsum(a22); o2[3] = hsum(a23);
            }
        }
        for (; r + 2 <= n; r += 2, first = 0) {
            const float *x0 = x + r * K, *x1 = x0 + K;
            for (int64_t o = ob; o < oe; o += 4) {
                const WEIGHT_T *w0 = w + o * K;
                __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
                __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
                OVER_K(STEP2);
                float *o0 = out + r * ld + o, *o1 = o0 + ld;
                o0[0] = hsum(a00); o0[1] = hsum(a01); o0[2] = hsum(a02); o0[3] = hsum(a03);
                o1[0] = hsum(a10); o1[1] = hsum(a11); o1[2] = hsum(a12); o1[3] = hsum(a13);
            }
        }
        for (; r < n; r++, first = 0) {
            const float *x0 = x + r * K;
            for (int64_t o = ob; o < oe; o += 4) {
                const WEIGHT_T *w0 = w + o * K;
                __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
                OVER_K(STEP1);
                float *o0 = out + r * ld + o;
                o0[0] = hsum(a00); o0[1] = hsum(a01); o0[2] = hsum(a02); o0[3] = hsum(a03);
            }
        }
    }
}

#undef STEP1
#undef STEP2
#undef STEP3
#undef ROWS_DOT
#undef WEIGHT_T
#undef LOAD_W
