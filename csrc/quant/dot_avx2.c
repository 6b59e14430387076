/* dot_avx2.c — the kernels for CPUs with AVX2 + FMA + F16C (Haswell, Zen 1
 * and later). Compiled for that instruction set function by function
 * (target attributes), so one build also runs on CPUs without it: quant.c
 * only calls these after __builtin_cpu_supports said yes.
 *
 * Integer dot products: _mm256_maddubs_epi16 multiplies unsigned by signed
 * bytes and adds pairs into int16, saturating; every use below stays under
 * 32767 (at most 2 * 128 * 127 = 32512, Q8_0 through the sign trick), so
 * the block sums are exact. ggml's AVX2 kernels (ggml-cpu/arch/x86/quants.c)
 * are the model for the K-quants. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>

#include "simd_x86.h"

/* Σ of u8 * s8 products in 8 int32 lanes. */
AVX2 static inline __m256i dot_us8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* ------------------------------------------------------------ F32 / F16 / BF16 */

AVX2 static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 weights of an F32, F16 or BF16 row (kind) from value i, as floats. */
AVX2 static inline __m256 weights8(int kind, const void *row, int i) {
    if (kind == QT_F32) return _mm256_loadu_ps((const float *)row + i);
    const uint16_t *w = (const uint16_t *)row + i;
    return kind == QT_F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)) : bf16x8(w);
}

/* The loop F32, F16 and BF16 share, inlined with a constant kind: four
 * accumulators, then one, then the scalar tail. */
AVX2 static inline __attribute__((always_inline)) float dot_floats(int kind, int n, const void *row,
                                                                   const void *act) {
    const float *x = act;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(weights8(kind, row, i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(weights8(kind, row, i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(weights8(kind, row, i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(weights8(kind, row, i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(weights8(kind, row, i), _mm256_loadu_ps(x + i), a0);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) /* F16 through F16C's one instruction */
        sum += (kind == QT_F16 ? f16(((const uint16_t *)row)[i]) : quant_weight_at(kind, row, i)) * x[i];
    return sum;
}

AVX2 static float dot_f32(int n, const void *row, const void *act) { return dot_floats(QT_F32, n, row, act); }
AVX2 static float dot_f16(int n, const void *row, const void *act) { return dot_floats(QT_F16, n, row, act); }
AVX2 static float dot_bf16(int n, const void *row, const void *act) {
    return dot_floats(QT_BF16, n, row, act);
}

/* ------------------------------------------------------------ blocks of 32
 * Eight blocks at a time: their fp16 scales converted in one instruction and
 * multiplied by the activations' eight scales (stored contiguously), then
 * each block's int32 lanes scaled by its lane of that vector. */

AVX2 static inline __m256 lane(__m256 v, int k) { return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(k)); }

/* Q4_0: Σ (u - 8) y = Σ u y - 8 Σ y, the correction taken from the int32
 * lanes (each lane -Σy, eight lanes -8 Σy) so the block sum stays exact.
 * Q4_1: Σ (d u + m) dy y = d dy Σ u y + m (dy Σ y), the second term from the
 * activations' block sums. Q8_0: signed by signed through |w| and y carrying
 * w's sign (maddubs wants one unsigned side); w = -128 gives |w| = 128 as
 * unsigned, still exact. */

AVX2 static inline __m256i dot_ss8(__m256i w, __m256i y) {
    return dot_us8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
}

/* One block's products in 8 int32 lanes (exact); blk points at the block. */
AVX2 static inline __m256i block32(int kind, const unsigned char *blk, const int8_t *y, int32_t sum) {
    if (kind == B32_Q4_0)
        return _mm256_sub_epi32(dot_us8(nibbles32(((const block_q4_0 *)(const void *)blk)->qs), load32(y)),
                                _mm256_set1_epi32(sum));
    if (kind == B32_Q4_1) return dot_us8(nibbles32(((const block_q4_1 *)(const void *)blk)->qs), load32(y));
    return dot_ss8(load32(((const block_q8_0 *)(const void *)blk)->qs), load32(y));
}

/* The loop the three formats share, inlined with a constant kind (so each
 * kernel compiles to its own code): every block's scale d (at its start,
 * fp16) times the activation block's, two accumulators; Q4_1's minimum m
 * (right after d) times the activations' d Σ y beside. */
AVX2 static inline __attribute__((always_inline)) float dot_blocks32(int kind, size_t bytes, int n,
                                                                     const void *row, const void *act) {
    const unsigned char *w = row;
    const act_q8_32 a = quant_act_q8_32(act, n);
    const int nb = n / QK32;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc_m = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8) {
        const unsigned char *w8 = w + (size_t)b * bytes;
        const __m256 scale = _mm256_mul_ps(halves8(w8, bytes), _mm256_loadu_ps(a.d + b));
        if (kind == B32_Q4_1)
            acc_m = _mm256_fmadd_ps(halves8(w8 + 2, bytes), _mm256_loadu_ps(a.s + b), acc_m);
        for (int k = 0; k < 8; k += 2) {
            const __m256i p0 = block32(kind, w8 + (size_t)k * bytes, a.qs + QK32 * (b + k), a.sum[b + k]);
            const __m256i p1 =
                block32(kind, w8 + (size_t)(k + 1) * bytes, a.qs + QK32 * (b + k + 1), a.sum[b + k + 1]);
            acc0 = _mm256_fmadd_ps(lane(scale, k), _mm256_cvtepi32_ps(p0), acc0);
            acc1 = _mm256_fmadd_ps(lane(scale, k + 1), _mm256_cvtepi32_ps(p1), acc1);
        }
    }
    float mins = 0.0f;
    for (; b < nb; b++) {
        const unsigned char *wb = w + (size_t)b * bytes;
        const __m256i p = block32(kind, wb, a.qs + QK32 * b, a.sum[b]);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_at(wb) * a.d[b]), _mm256_cvtepi32_ps(p), acc0);
        if (kind == B32_Q4_1) mins += half_at(wb + 2) * a.s[b];
    }
    const float sum = hsum_ps(_mm256_add_ps(acc0, acc1));
    return kind == B32_Q4_1 ? sum + hsum_ps(acc_m) + mins : sum;
}

AVX2 static float dot_q4_0(int n, const void *row, const void *act) {
    return dot_blocks32(B32_Q4_0, sizeof(block_q4_0), n, row, act);
}

AVX2 static float dot_q4_1(int n, const void *row, const void *act) {
    return dot_blocks32(B32_Q4_1, sizeof(block_q4_1), n, row, act);
}

AVX2 static float dot_q8_0(int n, const void *row, const void *act) {
    return dot_blocks32(B32_Q8_0, sizeof(block_q8_0), n, row, act);
}

/* ------------------------------------------------------------ K-quants */

/* Byte shuffle that repeats int16 element i of each 128-bit half (scales
 * stored as 8 int16, duplicated in both halves). */
AVX2 static inline __m256i repeat_i16(__m256i v, int i) {
    return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)((2 * i + 1) << 8 | 2 * i)));
}

/* A Q4_K / Q5_K block's scales as int16 in both 128-bit halves (k4_scales). */
AVX2 static inline __m256i k4_scales2(const uint8_t scales[12], uint16_t dmin, const act_q8_K *a,
                                      __m128 *acc_m) {
    const __m128i sc = k4_scales(scales, dmin, a, acc_m);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(sc), sc, 1);
}

/* Q4_K and Q5_K (q5: with the fifth bits), inlined with a constant q5. */
AVX2 static inline __attribute__((always_inline)) float dot_k4(int q5, int n, const void *row,
                                                               const void *act) {
    const act_q8_K *a = act;
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int b = 0; b < n / QK_K; b++) {
        const k4_view w = quant_k4_block(q5, row, b);
        const __m256i scales = k4_scales2(w.scales, w.dmin, &a[b], &acc_m);
        const __m256i hbits = q5 ? _mm256_loadu_si256((const __m256i *)w.qh) : _mm256_setzero_si256();
        const int8_t *y = a[b].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++, y += 64) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(w.qs + 32 * j));
            __m256i lo = _mm256_and_si256(bits, m4), hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            if (q5) {
                /* bit 2j (2j+1) of each qh byte moved to bit 4: shifting 16-bit
                 * words right never brings a neighbour's bit to bit 0 of a byte */
                lo = _mm256_or_si256(
                    lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one), 4));
                hi = _mm256_or_si256(
                    hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one), 4));
            }
            const __m256i pl = _mm256_maddubs_epi16(lo, load32(y));
            const __m256i ph = _mm256_maddubs_epi16(hi, load32(y + 32));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(repeat_i16(scales, 2 * j), pl));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(repeat_i16(scales, 2 * j + 1), ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(a[b].d * f16(w.d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) + hsum_ps128(acc_m);
}

AVX2 static float dot_q4_K(int n, const void *row, const void *act) { return dot_k4(0, n, row, act); }
AVX2 static float dot_q5_K(int n, const void *row, const void *act) { return dot_k4(1, n, row, act); }

/* Q6_K: q - 32 with q unsigned 0..63: Σ sc (q - 32) y = Σ sc q y - 32 Σ sc bsum. */
AVX2 static float dot_q6_K(int n, const void *row, const void *act) {
    const block_q6_K *w = row;
    const act_q8_K *a = act;
    const __m256i m3 = _mm256_set1_epi8(3), m15 = _mm256_set1_epi8(15);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < n / QK_K; b++) {
        const float d = a[b].d * f16(w[b].d);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)w[b].scales);
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        const __m256i offset =
            _mm256_slli_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)a[b].bsums), sc16), 5);
        const uint8_t *ql = w[b].ql, *qh = w[b].qh;
        const int8_t *y = a[b].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, y += 128) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m15), _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m15),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m15),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m15),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4));
            for (int k = 0; k < 4; k++) {
                /* 32 values = two groups of 16: scales 8*half + 2k and 8*half + 2k + 1 */
                const int s = 8 * half + 2 * k;
                const __m128i pick =
                    _mm_set_epi8((char)(s + 1), (char)(s + 1), (char)(s + 1), (char)(s + 1), (char)(s + 1),
                                 (char)(s + 1), (char)(s + 1), (char)(s + 1), (char)s, (char)s, (char)s,
                                 (char)s, (char)s, (char)s, (char)s, (char)s);
                const __m256i scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pick));
                const __m256i p =
                    _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(y + 32 * k)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale, p));
            }
        }
        sumi = _mm256_sub_epi32(sumi, offset);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

void quant_kernels_avx2(quant_kernel t[QT_COUNT]) { QUANT_KERNEL_TABLE(t, dot_bf16, ACT_F32); }

#endif
