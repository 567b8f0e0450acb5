/* The attention rank's dispatch: rows (token, slot) ordered by a key (owner rank * E + expert), a
   stable counting sort, with their (segment, token, slot) labels and the token's hidden row
   copied into place: what argsort, two divisions, a stack, a gather and a bincount do in the
   reference (reference.dispatch_rows), in one pass. Pure data movement: the same bytes.

   Legend: R = T * K rows, X keys, row_bytes = D * itemsize. key [R] int64; y [T, D] contiguous,
   any dtype; meta out [R, 3] int32; y_out [R, D]; counts out [X] int64.
   Returns 0, or -1 when a key is outside [0, X) (nothing is written then). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int amoe_dispatch_rows(const int64_t *key, int64_t R, int64_t K, int64_t X, int32_t seg, const char *y,
                       int64_t row_bytes, int32_t *meta, char *y_out, int64_t *counts)
{
    for (int64_t r = 0; r < R; r++)
        if (key[r] < 0 || key[r] >= X)
            return -1;
    int64_t *next = calloc((size_t)X, sizeof(int64_t));
    if (!next)
        return -1;
    memset(counts, 0, sizeof(int64_t) * (size_t)X);
    for (int64_t r = 0; r < R; r++)
        counts[key[r]]++;
    for (int64_t x = 1; x < X; x++)
        next[x] = next[x - 1] + counts[x - 1];
    for (int64_t r = 0; r < R; r++) {
        const int64_t p = next[key[r]]++;
        const int64_t t = r / K;
        meta[3 * p] = seg;
        meta[3 * p + 1] = (int32_t)t;
        meta[3 * p + 2] = (int32_t)(r - t * K);
        memcpy(y_out + p * row_bytes, y + t * row_bytes, (size_t)row_bytes);
    }
    free(next);
    return 0;
}

/* The attention rank's token pool (sched/token_pool.py) taking one expert reply: rows r of src
   land at dst[(tok[r], slot[r])], marking done[tok * K + slot]. tok and slot are int32 columns
   of the reply's meta rows (stride elements apart). Validated before any row is written: returns
   -1 for a (token, slot) outside [0, T) x [0, K), -2 for one already delivered or repeated in
   this reply (the marks are then as they were), else the number of rows. */
int64_t amoe_pool_scatter(const int32_t *tok, const int32_t *slot, int64_t stride, int64_t R, int64_t T, int64_t K,
                          uint8_t *done, const char *src, int64_t row_bytes, char *dst)
{
    for (int64_t r = 0; r < R; r++) {
        const int64_t t = tok[r * stride], s = slot[r * stride];
        if (t < 0 || t >= T || s < 0 || s >= K)
            return -1;
    }
    for (int64_t r = 0; r < R; r++) {
        const int64_t x = tok[r * stride] * K + slot[r * stride];
        if (done[x]) {
            for (int64_t j = 0; j < r; j++)
                done[tok[j * stride] * K + slot[j * stride]] = 0;
            return -2;
        }
        done[x] = 1;
    }
    for (int64_t r = 0; r < R; r++)
        memcpy(dst + (tok[r * stride] * K + slot[r * stride]) * row_bytes, src + r * row_bytes, (size_t)row_bytes);
    return R;
}
