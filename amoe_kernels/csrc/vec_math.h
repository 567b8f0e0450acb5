/* Shared 8-lane (AVX2 + FMA) math of the native kernels; included only under __AVX2__ && __FMA__. */

#ifndef AMOE_VEC_MATH_H
#define AMOE_VEC_MATH_H

#include <immintrin.h>

/* e^x for |x| <= 87, eight lanes: 2^(x log2 e) = 2^i 2^f, 2^f by a degree-6 fit (1e-7 relative). */
static inline __m256 exp8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(87.f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
    const __m256 fi = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, fi);
    __m256 p = _mm256_set1_ps(1.5465317883e-04f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3395285364e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6180399298e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503406681e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651101e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314720007e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i two_i = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fi), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_i));
}

/* Eight fp32 weights as stored (rows_dot.h's LOAD_W for fp32 weights). */
static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

/* The sum of eight lanes, in the order every dot product of rows_dot.h ends with. */
static inline float hsum(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
