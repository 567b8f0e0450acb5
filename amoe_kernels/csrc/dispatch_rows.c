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
