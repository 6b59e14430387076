/* simd_x86.h — the AVX2 helpers dot_avx2.c and dot_avx512.c share. Compiled
 * for AVX2 + FMA + F16C (target attributes); the AVX-512 kernels inline them
 * too, their instruction set including these. Include after <immintrin.h>. */
#ifndef CEPE_QUANT_SIMD_X86_H
#define CEPE_QUANT_SIMD_X86_H

#include "quant_impl.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum_ps128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline float hsum_ps(__m256 v) {
    return hsum_ps128(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

AVX2 static inline float f16(uint16_t h) { return _cvtsh_ss(h); }

AVX2 static inline float half_at(const unsigned char *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16(h);
}

/* The fp16 at p, p + stride, ..., p + 7 stride as 8 floats. */
AVX2 static inline __m256 halves8(const void *p, size_t stride) {
    const unsigned char *c = p;
    uint16_t h[8];
    for (int k = 0; k < 8; k++) memcpy(&h[k], c + (size_t)k * stride, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

AVX2 static inline __m256i load32(const int8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 16 bytes of nibbles -> 32 bytes 0..15: low nibbles first, then high (Q4_0 / Q4_1 order). */
AVX2 static inline __m256i nibbles32(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* Q4_0, Q4_1, Q8_0: what dot_blocks32 of each file is inlined with. */
enum { B32_Q4_0, B32_Q4_1, B32_Q8_0 };

/* The 8 scales of a Q4_K / Q5_K block as int16; its minimum terms
 * -dmin Σ_j m_j Σ_{sub-block j} y (4 lanes) added to *acc_m. */
AVX2 static inline __m128i k4_scales(const uint8_t scales[12], uint16_t dmin, const act_q8_K *a,
                                     __m128 *acc_m) {
    uint8_t sm[16];
    quant_unpack_k4(scales, sm);
    const __m128i m = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(sm + 8)));
    const __m128i s = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)a->bsums),
                                     _mm_loadu_si128((const __m128i *)(a->bsums + 8)));
    *acc_m = _mm_fmadd_ps(_mm_set1_ps(-a->d * f16(dmin)), _mm_cvtepi32_ps(_mm_madd_epi16(m, s)), *acc_m);
    return _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sm));
}

#endif /* CEPE_QUANT_SIMD_X86_H */
