/* dot_avx512.c — the kernels for CPUs with AVX-512 F/BW/VL and VNNI (Ice
 * Lake, Sapphire Rapids, Zen 4 and later), 64 values per register, and the
 * BF16 kernel for those with AVX512-BF16. Target attributes, as in
 * dot_avx2.c: one build runs everywhere, these only where the CPU has them.
 *
 * VNNI: _mm512_dpbusd_epi32 multiplies unsigned by signed bytes and adds each
 * four into an int32 lane without saturating, _mm512_dpwssd_epi32 does the
 * same for int16 pairs; both exact here. Signed weights (Q8_0) are made
 * unsigned by adding 128 (xor 0x80) and the 128 Σy that adds is taken out
 * of the lanes' starting value, so the sums stay exact integers. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>

#include "simd_x86.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma,f16c")))

/* Two 256-bit halves into one register. */
AVX512 static inline __m512i join(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

AVX512 static inline __m512 join_ps(float lo, float hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(lo))),
                                               _mm256_castps_pd(_mm256_set1_ps(hi)), 1));
}

AVX512 static inline __m512i join_epi32(int lo, int hi) {
    return join(_mm256_set1_epi32(lo), _mm256_set1_epi32(hi));
}

/* ------------------------------------------------------------ F32 / F16 / BF16 */

AVX512 static inline __m512 bf16x16(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* 16 weights of an F32, F16 or BF16 row (kind) from value i, as floats;
 * lanes outside the mask m are zero when masked. */
AVX512 static inline __m512 weights16(int kind, const void *row, int i, int masked, __mmask16 m) {
    if (kind == QT_F32)
        return masked ? _mm512_maskz_loadu_ps(m, (const float *)row + i)
                      : _mm512_loadu_ps((const float *)row + i);
    const uint16_t *w = (const uint16_t *)row + i;
    const __m256i h = masked ? _mm256_maskz_loadu_epi16(m, w) : _mm256_loadu_si256((const __m256i *)w);
    return kind == QT_F16 ? _mm512_cvtph_ps(h) : bf16x16(h);
}

/* The loop F32, F16 and BF16-by-fp32 share, inlined with a constant kind:
 * four accumulators, then one, then the last n % 16 values masked. */
AVX512 static inline __attribute__((always_inline)) float dot_floats(int kind, int n, const void *row,
                                                                     const void *act) {
    const float *x = act;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
           a3 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(weights16(kind, row, i, 0, 0), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(weights16(kind, row, i + 16, 0, 0), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(weights16(kind, row, i + 32, 0, 0), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(weights16(kind, row, i + 48, 0, 0), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16)
        a0 = _mm512_fmadd_ps(weights16(kind, row, i, 0, 0), _mm512_loadu_ps(x + i), a0);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        a1 = _mm512_fmadd_ps(weights16(kind, row, i, 1, m), _mm512_maskz_loadu_ps(m, x + i), a1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

AVX512 static float dot_f32(int n, const void *row, const void *act) {
    return dot_floats(QT_F32, n, row, act);
}
AVX512 static float dot_f16(int n, const void *row, const void *act) {
    return dot_floats(QT_F16, n, row, act);
}

/* BF16 weights by fp32 activations (AVX-512 CPUs without AVX512-BF16). */
AVX512 static float dot_bf16_f32(int n, const void *row, const void *act) {
    return dot_floats(QT_BF16, n, row, act);
}

/* BF16 weights by bf16 activations: vdpbf16ps multiplies 32 pairs exactly
 * (8-bit significands) and adds them in fp32. It treats subnormal inputs and
 * results as zero (below 1.2e-38, negligible beside any real activation). */
AVX512BF16 static float dot_bf16_dp(int n, const void *row, const void *act) {
    const uint16_t *w = row, *x = act;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32),
                              (__m512bh)_mm512_loadu_si512(x + i + 32));
    }
    for (; i + 32 <= n; i += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    if (i < n) { /* masked-off lanes load zeros, which add nothing */
        const __mmask32 m = (__mmask32)((1ull << (n - i)) - 1);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w + i),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, x + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* ------------------------------------------------------------ blocks of 32, two per register
 * Eight blocks at a time, as in dot_avx2.c: their scales in one vector, each
 * pair of blocks taking its two lanes of it (and of the offset sums). */

/* The 32 nibbles of blocks p and q as bytes 0..15, in value order: [p lo, p hi, q lo, q hi]. */
AVX512 static inline __m512i nibbles64(const uint8_t *p, const uint8_t *q) {
    const __m512i t = _mm512_castsi256_si512(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)), _mm_loadu_si128((const __m128i *)q), 1));
    const __m512i dup = _mm512_shuffle_i64x2(t, t, _MM_SHUFFLE(1, 1, 0, 0));
    const __m512i shifted = _mm512_srlv_epi64(dup, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
}

/* Lanes 0..7 = v[k], lanes 8..15 = v[k + 1], from 8 values in v. */
AVX512 static inline __m512 pair_ps(__m256 v, int k) {
    return _mm512_permutexvar_ps(join_epi32(k, k + 1), _mm512_castps256_ps512(v));
}

AVX512 static inline __m512i pair_epi32(__m256i v, int k) {
    return _mm512_permutexvar_epi32(join_epi32(k, k + 1), _mm512_castsi256_si512(v));
}

/* Q4_0: Σ (u - 8) y; each of a block's eight lanes starts at -Σy. Q4_1:
 * d dy Σ u y + m (dy Σ y), the second term from the activations' block sums.
 * Q8_0: (w + 128) unsigned; each of a block's eight lanes starts at -16 Σy.
 * (B32_Q4_0 .. B32_Q8_0: simd_x86.h.) */
/* The weights of blocks p and q (pointers to the blocks) as unsigned bytes, in value order. */
AVX512 static inline __m512i weights64(int kind, const unsigned char *p, const unsigned char *q,
                                       __m512i flip) {
    if (kind == B32_Q4_0)
        return nibbles64(((const block_q4_0 *)(const void *)p)->qs,
                         ((const block_q4_0 *)(const void *)q)->qs);
    if (kind == B32_Q4_1)
        return nibbles64(((const block_q4_1 *)(const void *)p)->qs,
                         ((const block_q4_1 *)(const void *)q)->qs);
    return _mm512_xor_si512(join(load32(((const block_q8_0 *)(const void *)p)->qs),
                                 load32(((const block_q8_0 *)(const void *)q)->qs)),
                            flip);
}

AVX512 static inline __m256i weights32(int kind, const unsigned char *p, __m512i flip) {
    if (kind == B32_Q4_0) return nibbles32(((const block_q4_0 *)(const void *)p)->qs);
    if (kind == B32_Q4_1) return nibbles32(((const block_q4_1 *)(const void *)p)->qs);
    return _mm256_xor_si256(load32(((const block_q8_0 *)(const void *)p)->qs), _mm512_castsi512_si256(flip));
}

/* The loop the three formats share, inlined with a constant kind (so each
 * kernel compiles to its own code): every block's scale d (at its start,
 * fp16) times the activation block's; Q4_1's minimum m (right after d) times
 * the activations' d Σ y beside. */
AVX512 static inline __attribute__((always_inline)) float dot_blocks32(int kind, size_t bytes, int n,
                                                                       const void *row, const void *act) {
    const unsigned char *w = row;
    const act_q8_32 a = quant_act_q8_32(act, n);
    const int nb = n / QK32;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_m = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8) {
        const unsigned char *w8 = w + (size_t)b * bytes;
        const __m256 scale = _mm256_mul_ps(halves8(w8, bytes), _mm256_loadu_ps(a.d + b));
        const __m256i sums = _mm256_loadu_si256((const __m256i *)(a.sum + b));
        const __m256i offset = kind == B32_Q8_0 ? _mm256_mullo_epi32(sums, _mm256_set1_epi32(-16))
                                                : _mm256_sub_epi32(_mm256_setzero_si256(), sums);
        if (kind == B32_Q4_1)
            acc_m = _mm256_fmadd_ps(halves8(w8 + 2, bytes), _mm256_loadu_ps(a.s + b), acc_m);
        for (int k = 0; k < 8; k += 2) {
            const __m512i init = kind == B32_Q4_1 ? _mm512_setzero_si512() : pair_epi32(offset, k);
            const __m512i p = _mm512_dpbusd_epi32(
                init, weights64(kind, w8 + (size_t)k * bytes, w8 + (size_t)(k + 1) * bytes, flip),
                _mm512_loadu_si512(a.qs + QK32 * (b + k)));
            acc = _mm512_fmadd_ps(pair_ps(scale, k), _mm512_cvtepi32_ps(p), acc);
        }
    }
    float sum = _mm512_reduce_add_ps(acc);
    if (kind == B32_Q4_1) sum += hsum_ps(acc_m);
    for (; b < nb; b++) {
        const unsigned char *wb = w + (size_t)b * bytes;
        const int32_t off = kind == B32_Q4_1 ? 0 : kind == B32_Q8_0 ? -16 * a.sum[b] : -a.sum[b];
        const __m256i p =
            _mm256_dpbusd_epi32(_mm256_set1_epi32(off), weights32(kind, wb, flip), load32(a.qs + QK32 * b));
        if (kind == B32_Q4_1)
            sum += half_at(wb) * a.d[b] * hsum_ps(_mm256_cvtepi32_ps(p)) + half_at(wb + 2) * a.s[b];
        else
            sum += half_at(wb) * a.d[b] * hsum_ps(_mm256_cvtepi32_ps(p));
    }
    return sum;
}

AVX512 static float dot_q4_0(int n, const void *row, const void *act) {
    return dot_blocks32(B32_Q4_0, sizeof(block_q4_0), n, row, act);
}

AVX512 static float dot_q4_1(int n, const void *row, const void *act) {
    return dot_blocks32(B32_Q4_1, sizeof(block_q4_1), n, row, act);
}

AVX512 static float dot_q8_0(int n, const void *row, const void *act) {
    return dot_blocks32(B32_Q8_0, sizeof(block_q8_0), n, row, act);
}

/* ------------------------------------------------------------ K-quants, 64 values per register
 * Bytes times activations into int16 pairs (maddubs, below 32767), then
 * dpwssd multiplies each pair sum by its sub-block's scale into int32. */

/* 32 bytes into both halves, the upper half shifted right by 4 bits: with a
 * nibble mask, the low nibbles then the high ones (Q4_K / Q5_K order). */
AVX512 static inline __m512i nibble_pair(const uint8_t *p) {
    const __m512i dup = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_and_si512(_mm512_srlv_epi64(dup, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)),
                            _mm512_set1_epi8(0x0F));
}

/* int16 lanes 0..15 = s[i], 16..31 = s[i + 1], from 8 int16 scales in s. */
AVX512 static inline __m512i scales_pair(__m512i s, int i) {
    const __m512i idx = join(_mm256_set1_epi16((short)i), _mm256_set1_epi16((short)(i + 1)));
    return _mm512_permutexvar_epi16(idx, s);
}

/* Q4_K and Q5_K (q5: with the fifth bits), inlined with a constant q5. */
AVX512 static inline __attribute__((always_inline)) float dot_k4(int q5, int n, const void *row,
                                                                 const void *act) {
    const act_q8_K *a = act;
    const __m512i sixteen = _mm512_set1_epi8(16);
    __m512 acc = _mm512_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int b = 0; b < n / QK_K; b++) {
        const k4_view w = quant_k4_block(q5, row, b);
        const __m512i sc = _mm512_castsi128_si512(k4_scales(w.scales, w.dmin, &a[b], &acc_m));
        const __m512i qh =
            q5 ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)w.qh)) : _mm512_setzero_si512();
        __m512i sumi = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            __m512i q = nibble_pair(w.qs + 32 * j);
            if (q5) { /* bit 2j of qh for the first 32 values, bit 2j + 1 for the next 32 */
                const __m512i bit =
                    join(_mm256_set1_epi8((char)(1 << (2 * j))), _mm256_set1_epi8((char)(1 << (2 * j + 1))));
                q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(qh, bit), q, sixteen);
            }
            const __m512i p = _mm512_maddubs_epi16(q, _mm512_loadu_si512(a[b].qs + 64 * j));
            sumi = _mm512_dpwssd_epi32(sumi, p, scales_pair(sc, 2 * j));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[b].d * f16(w.d)), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc) + hsum_ps128(acc_m);
}

AVX512 static float dot_q4_K(int n, const void *row, const void *act) { return dot_k4(0, n, row, act); }
AVX512 static float dot_q5_K(int n, const void *row, const void *act) { return dot_k4(1, n, row, act); }

/* Q6_K: Σ sc (q - 32) y = Σ sc q y - 32 Σ sc bsum, the second term as the
 * lanes' starting value. 16 values per scale: int16 lanes 8k..8k+7 of a
 * 64-value register take scale 4g + k. */
AVX512 static float dot_q6_K(int n, const void *row, const void *act) {
    const block_q6_K *w = row;
    const act_q8_K *a = act;
    const __m512i m15 = _mm512_set1_epi8(15), m3 = _mm512_set1_epi8(3);
    const __m512i shift_lo = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0),
                  shift_hi = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < n / QK_K; b++) {
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w[b].scales));
        const __m512i sc = _mm512_castsi256_si512(sc16);
        const __m256i offset =
            _mm256_slli_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)a[b].bsums), sc16), 5);
        __m512i sumi =
            _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_sub_epi32(_mm256_setzero_si256(), offset), 0);
        for (int half = 0; half < 2; half++) {
            const __m512i l = _mm512_loadu_si512(w[b].ql + 64 * half);
            const __m512i h =
                _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w[b].qh + 32 * half)));
            /* values 0..63 of the half: low nibbles + qh bits 0-1 / 2-3; 64..127: high nibbles + bits 4-5 /
             * 6-7 */
            const __m512i q0 =
                _mm512_or_si512(_mm512_and_si512(l, m15),
                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(h, shift_lo), m3), 4));
            const __m512i q1 =
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m15),
                                _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(h, shift_hi), m3), 4));
            const int8_t *y = a[b].qs + 128 * half;
            for (int g = 0; g < 2; g++) {
                const int s = 8 * half + 4 * g;
                const __m512i idx = join(
                    _mm256_set_epi16((short)(s + 1), (short)(s + 1), (short)(s + 1), (short)(s + 1),
                                     (short)(s + 1), (short)(s + 1), (short)(s + 1), (short)(s + 1), (short)s,
                                     (short)s, (short)s, (short)s, (short)s, (short)s, (short)s, (short)s),
                    _mm256_set_epi16((short)(s + 3), (short)(s + 3), (short)(s + 3), (short)(s + 3),
                                     (short)(s + 3), (short)(s + 3), (short)(s + 3), (short)(s + 3),
                                     (short)(s + 2), (short)(s + 2), (short)(s + 2), (short)(s + 2),
                                     (short)(s + 2), (short)(s + 2), (short)(s + 2), (short)(s + 2)));
                const __m512i p = _mm512_maddubs_epi16(g ? q1 : q0, _mm512_loadu_si512(y + 64 * g));
                sumi = _mm512_dpwssd_epi32(sumi, p, _mm512_permutexvar_epi16(idx, sc));
            }
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(a[b].d * f16(w[b].d)), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

void quant_kernels_avx512(quant_kernel t[QT_COUNT], int has_bf16) {
    QUANT_KERNEL_TABLE(t, has_bf16 ? dot_bf16_dp : dot_bf16_f32, has_bf16 ? ACT_BF16 : ACT_F32);
}

#endif
