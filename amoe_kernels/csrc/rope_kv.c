/* RoPE on a block's fused q/k projection and the paged KV write, in one pass: q comes out
   rotated and contiguous (what the decode attention reads), k is rotated straight into its cache
   slot, v copied into its slot. The reference (reference.rope_kv_write) takes ~10 torch ops.

   out = x * cos + swap_halves(x) * signed_sin, sin's first half negated by the caller (the
   layout model/layers.rope_tables builds once per step): built without fused multiply-adds,
   every product and the sum round as torch's elementwise ops do, so the bits are the
   reference's.

   Legend: T tokens, H query heads, G KV heads, d head dim, X cache slots (blocks * block size).
   qkv [T, ldx] fp32 rows holding q (H*d), k (G*d), v (G*d) in that order; cos, sin [T, d];
   slots [T] int64; k_cache, v_cache [X, G, d]; q_out [T, H, d]. Returns 0, or -1 when a slot is
   outside [0, X) or d is odd (nothing is written then). */

#include <stdint.h>
#include <string.h>

int amoe_rope_kv_write_f32(const float *qkv, int64_t ldx, const float *cos, const float *sin, int64_t T,
                           int64_t H, int64_t G, int64_t d, const int64_t *slots, int64_t X, float *k_cache,
                           float *v_cache, float *q_out)
{
    if (d % 2)
        return -1;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= X)
            return -1;
    const int64_t half = d / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *x = qkv + t * ldx, *c = cos + t * d, *s = sin + t * d;
        for (int64_t h = 0; h < H + G; h++) {
            const float *xh = x + h * d;
            float *o = h < H ? q_out + (t * H + h) * d : k_cache + (slots[t] * G + (h - H)) * d;
#pragma omp simd
            for (int64_t i = 0; i < half; i++)
                o[i] = xh[i] * c[i] + xh[i + half] * s[i];
#pragma omp simd
            for (int64_t i = half; i < d; i++)
                o[i] = xh[i] * c[i] + xh[i - half] * s[i];
        }
        memcpy(v_cache + slots[t] * G * d, x + (H + G) * d, sizeof(float) * (size_t)(G * d));
    }
    return 0;
}
