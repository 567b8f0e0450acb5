/* The attention side of one block for an all-decode fp32 batch, in one call: what the attention
   rank runs per block step, T tokens at a time.

   On CPU this step is paced by host work, not FLOPs: as ~15 torch and native calls it took
   ~550 µs for 32 tokens here, of which ~110 µs is arithmetic. Here the same kernels run back to
   back in C: the RMSNorms, RoPE with the KV write and the decode attention are the functions of
   rows.c, rope_kv.c and paged_decode.c, and the projections and the router are linear.c's, the
   function the unfused path's linear calls. So the result is the unfused path's, bit for bit: a
   token's numbers do not depend on which path its step took.

   Legend: T tokens (one per sequence), D hidden, H query heads, G KV heads, d head dim,
   Q = (H + 2G) d fused projection rows, E experts, K top-k, R = T K dispatch rows, X keys,
   M blocks per table, bs block size, N cache blocks. */

#include <math.h>
#include <stdint.h>
#include <string.h>

void amoe_rms_norm_f32(const float *x, const float *w, int64_t T, int64_t D, float eps, float *y);
int amoe_rope_kv_write_f32(const float *qkv, int64_t ldx, const float *cos, const float *sin, int64_t T,
                           int64_t H, int64_t G, int64_t d, const int64_t *slots, int64_t X, float *k_cache,
                           float *v_cache, float *q_out);
int amoe_paged_decode_f32(const float *q, const float *k, const float *v, const int64_t *tables, int64_t M,
                          const int64_t *lens, int64_t S, int64_t H, int64_t G, int64_t d, int64_t bs, int64_t N,
                          float scale, float *out);
int amoe_dispatch_rows(const int64_t *key, int64_t R, int64_t K, int64_t X, int32_t seg, const char *y,
                       int64_t row_bytes, int32_t *meta, char *y_out, int64_t *counts);

/* linear.c; D and H d are multiples of 8 here (amoe_kernels.dispatch declines the step otherwise). */
int amoe_linear_f32(const float *x, int64_t T, int64_t D, const float *w, int64_t O, float *y);

/* Softmax over E logits in fp32, the K largest in descending order (ties: lower expert first),
   renormalised over the K when asked. Returns -1 for K outside [1, E] (nothing written). */
int amoe_topk_gating_f32(const float *logits, int64_t T, int64_t E, int64_t K, int renormalize, float *w_out,
                         int64_t *ids_out)
{
    if (K < 1 || K > E)
        return -1;
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        float m = l[0];
        for (int64_t e = 1; e < E; e++)
            m = l[e] > m ? l[e] : m;
        float s = 0.f;
        for (int64_t e = 0; e < E; e++)
            s += expf(l[e] - m);
        float *w = w_out + t * K;
        int64_t *ids = ids_out + t * K;
        for (int64_t k = 0; k < K; k++) { /* K is small (1-8): selection, not a sort */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t j = 0; j < k; j++)
                    taken |= ids[j] == e;
                if (!taken && (best < 0 || l[e] > l[best]))
                    best = e;
            }
            ids[k] = best;
            w[k] = expf(l[best] - m) / s;
        }
        if (renormalize) {
            float z = 0.f;
            for (int64_t k = 0; k < K; k++)
                z += w[k];
            for (int64_t k = 0; k < K; k++)
                w[k] = w[k] / z;
        }
    }
    return 0;
}

/* The block up to the attention: a = rms_norm(x) [T, D] and qkv = a w_qkv^T [T, Q] (scratch),
   RoPE on q and k, k and v into the caches at slots [T] (X slots), q out [T, H, d] contiguous.
   Any rows: prefill and decode alike. Returns 0, or -1 for a bad slot or an odd d. */
int amoe_attn_pre_f32(const float *x, int64_t T, int64_t D, const float *ln1, const float *w_qkv,
                      float eps, int64_t H, int64_t G, int64_t d, const float *cos, const float *sin,
                      const int64_t *slots, int64_t X, float *k_cache, float *v_cache, float *a, float *qkv, float *q)
{
    const int64_t Q = (H + 2 * G) * d;
    amoe_rms_norm_f32(x, ln1, T, D, eps, a);
    amoe_linear_f32(a, T, D, w_qkv, Q, qkv);
    return amoe_rope_kv_write_f32(qkv, Q, cos, sin, T, H, G, d, slots, X, k_cache, v_cache, q);
}

/* The block after the attention: h = x + o w_o^T [T, D] (o [T, Hd]; a [T, D] scratch), y =
   rms_norm(h); when route_given is 0, ids/w [T, K] = top-k of softmax(y w_gate^T) (logits
   [T, E] scratch), else the caller's; then the dispatch rows of (token, slot) keyed by
   key_E[ids] (dispatch_rows.c). Returns 0, -2 for an expert id outside [0, E) or a key outside
   [0, X), -3 for a bad K. */
int amoe_attn_post_f32(const float *x, const float *o, int64_t T, int64_t D, int64_t Hd,
                       const float *w_o, const float *ln2, const float *w_gate, float eps, int64_t E, int64_t K,
                       int renormalize, int route_given, const int64_t *key_E, int64_t X, int32_t seg, float *a,
                       float *logits, int64_t *key_R, float *h, float *y, float *w_TK, int64_t *ids_TK,
                       int32_t *meta, float *y_RD, int64_t *counts)
{
    amoe_linear_f32(o, T, Hd, w_o, D, a);
    for (int64_t i = 0; i < T * D; i++)
        h[i] = x[i] + a[i];
    amoe_rms_norm_f32(h, ln2, T, D, eps, y);
    if (!route_given) {
        amoe_linear_f32(y, T, D, w_gate, E, logits);
        if (amoe_topk_gating_f32(logits, T, E, K, renormalize, w_TK, ids_TK))
            return -3;
    }
    for (int64_t r = 0; r < T * K; r++) {
        if (ids_TK[r] < 0 || ids_TK[r] >= E)
            return -2;
        key_R[r] = key_E[ids_TK[r]];
    }
    if (amoe_dispatch_rows(key_R, T * K, K, X, seg, (const char *)y, D * (int64_t)sizeof(float), meta,
                           (char *)y_RD, counts))
        return -2;
    return 0;
}

/* pre, the decode attention of one query per sequence (sequence t attends to lens[t] positions
   through tables [T, M]; caches [N * bs, G, d]) and post, in one call: the whole block of an
   all-decode batch. scratch: T * (D + Q + 2 H d + E) floats. Returns 0; -1 for a bad slot,
   block, length or head shape, -2 / -3 as post (the cache may hold this step's K/V then). */
int amoe_attn_decode_block_f32(const float *x, int64_t T, int64_t D, const float *ln1,
                               const float *w_qkv, const float *w_o, const float *ln2, const float *w_gate,
                               float eps, int64_t H, int64_t G, int64_t d, const float *cos, const float *sin,
                               const int64_t *slots, float *k_cache, float *v_cache, const int64_t *tables,
                               int64_t M, const int64_t *lens, int64_t bs, int64_t N, float scale, int64_t E,
                               int64_t K, int renormalize, int route_given, const int64_t *key_E, int64_t X,
                               int32_t seg, float *scratch, int64_t *key_R, float *h, float *y, float *w_TK,
                               int64_t *ids_TK, int32_t *meta, float *y_RD, int64_t *counts)
{
    const int64_t Q = (H + 2 * G) * d, Hd = H * d;
    float *a = scratch, *qkv = a + T * D, *q = qkv + T * Q, *o = q + T * Hd, *logits = o + T * Hd;
    if (amoe_attn_pre_f32(x, T, D, ln1, w_qkv, eps, H, G, d, cos, sin, slots, N * bs, k_cache, v_cache, a,
                          qkv, q))
        return -1;
    if (amoe_paged_decode_f32(q, k_cache, v_cache, tables, M, lens, T, H, G, d, bs, N, scale, o))
        return -1;
    return amoe_attn_post_f32(x, o, T, D, Hd, w_o, ln2, w_gate, eps, E, K, renormalize, route_given, key_E, X,
                              seg, a, logits, key_R, h, y, w_TK, ids_TK, meta, y_RD, counts);
}
