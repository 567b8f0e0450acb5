/* Row-wise fp32 ops of the attention rank's block step, one call each instead of the 4-6 torch
   ops (each 3-10 µs of host time here) that the PyTorch references take.

   Built with -ffp-contract=off: no multiply-add is fused, so every product and sum is rounded as
   torch's elementwise ops round them, and moe_combine gives the reference's exact bits.
   Legend: T rows, D hidden, K top-k slots. All arrays contiguous fp32. */

#include <math.h>
#include <stdint.h>

/* y = w * (x * (1 / sqrt(mean(x^2) + eps))): HF's RMSNorm in fp32. The mean is summed in 8
   lanes, as a vectorized reduction does, so it may differ from torch's in the last bit. */
void amoe_rms_norm_f32(const float *x, const float *w, int64_t T, int64_t D, float eps, float *y)
{
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * D;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < D; i++)
            ss += xt[i] * xt[i];
        const float r = 1.f / sqrtf(ss / (float)D + eps);
        float *yt = y + t * D;
#pragma omp simd
        for (int64_t i = 0; i < D; i++)
            yt[i] = w[i] * (xt[i] * r);
    }
}

/* y = h + ((out_0 w_0 + out_1 w_1) + ...): the top-k merge in fixed slot order (reference
   combine_slots, then the residual add), bit for bit. */
void amoe_moe_combine_f32(const float *h, const float *out, const float *w, int64_t T, int64_t K, int64_t D,
                          float *y)
{
    for (int64_t t = 0; t < T; t++) {
        const float *ot = out + t * K * D, *wt = w + t * K, *ht = h + t * D;
        float *yt = y + t * D;
        const float w0 = wt[0];
#pragma omp simd
        for (int64_t i = 0; i < D; i++)
            yt[i] = ot[i] * w0;
        for (int64_t k = 1; k < K; k++) {
            const float wk = wt[k];
            const float *ok = ot + k * D;
#pragma omp simd
            for (int64_t i = 0; i < D; i++)
                yt[i] = yt[i] + ok[i] * wk;
        }
#pragma omp simd
        for (int64_t i = 0; i < D; i++)
            yt[i] = ht[i] + yt[i];
    }
}
