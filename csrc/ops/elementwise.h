/* elementwise.h — per-element math shared by the C ops and the CUDA kernels.
 * Compiled by gcc (CPU ops, CPU tests) and by nvcc (__host__ __device__), so
 * the CPU test suite checks exactly the arithmetic the GPU runs. */
#ifndef CEPE_ELEMENTWISE_H
#define CEPE_ELEMENTWISE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define CEPE_HD __host__ __device__ __forceinline__
#else
#define CEPE_HD static inline
#endif

/* The float whose bits are i (memcpy is how C says it; it compiles to a
 * register move and, unlike a union, lets GCC vectorize the caller). */
CEPE_HD float cepe_bits_to_float(int i) {
#ifdef __CUDA_ARCH__
    return __int_as_float(i);
#else
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
#endif
}

/* The bits of f (cepe_bits_to_float's inverse). */
CEPE_HD uint32_t cepe_float_to_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

/* bf16 is the top half of an fp32. Rounded to nearest, ties to even: adding
 * 0x7fff plus the lowest kept bit carries into the kept half exactly when the
 * dropped half is above one half, or equal to it with an odd kept half.
 * Overflow rounds to inf, as it should; a NaN stays a (quiet) NaN instead of
 * being rounded into inf. */
CEPE_HD uint16_t cepe_float_to_bf16(float x) {
    const uint32_t u = cepe_float_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* bf16 bits -> float, exactly. */
CEPE_HD float cepe_bf16_to_float(uint16_t h) { return cepe_bits_to_float((int)((uint32_t)h << 16)); }

/* exp(x) for x <= 0 as used by softmax: Cephes' expf polynomial (relative
 * error ~2e-7) written without calls or branches so loops over it vectorize.
 * exp(-inf) and anything below -87 return 0. */
CEPE_HD float cepe_exp_neg(float x) {
    const float keep = x > -87.0f ? 1.0f : 0.0f;
    x = x > -87.0f ? x : -87.0f;
    /* n = round(x / ln 2) by the 1.5 * 2^23 trick rather than floorf, which
     * gcc will not vectorize unless trapping math is off. Any integer within
     * 1/2 of x / ln 2 keeps |r| <= ln 2 / 2, so ties may go either way. */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float scale = cepe_bits_to_float(((int)n + 127) << 23); /* 2^n, n in [-126, 0] */
    return p * scale * keep;
}

/* SiLU(x) = x * sigmoid(x), through exp(-|x|) so it never overflows and the
 * loop calling it vectorizes. */
CEPE_HD float cepe_silu(float x) {
    const float e = cepe_exp_neg(x >= 0.0f ? -x : x); /* exp(-|x|) in (0, 1] */
    const float sig = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
    return x * sig;
}

/* SwiGLU as in LLaMA's MLP: silu(gate) * up. */
CEPE_HD float cepe_swiglu(float gate, float up) { return cepe_silu(gate) * up; }

/* RMSNorm's scale for a row whose sum of squares is `ss` over `n` items.
 * NaN when ss overflowed float32: 1/sqrt(inf) = 0 would zero the row, and a
 * forward that overflowed would hand back plausible all-zero logits instead
 * of non-finite ones its caller can detect. */
CEPE_HD float cepe_rms_inv(float ss, int n, float eps) {
    return ss <= 3.40282347e+38f ? 1.0f / sqrtf(ss / (float)n + eps) : cepe_bits_to_float(0x7fc00000);
}

/* RoPE rotate-half pair (x1 = x[i], x2 = x[i + d/2]) by angle with cos c, sin s. */
CEPE_HD void cepe_rope_rotate(float *x1, float *x2, float c, float s) {
    float a = *x1, b = *x2;
    *x1 = a * c - b * s;
    *x2 = b * c + a * s;
}

/* Attention's visible key range [lo, hi) for the query in slot qs (its
 * position among the Tk keys): causal keeps keys j <= qs, a window > 0 keeps
 * qs - j < window. Both ends are non-decreasing in qs, so the union over a
 * run of queries is [lo(first), hi(last)). Padding (key_valid) is separate. */
CEPE_HD void cepe_key_range(int Tk, int causal, int window, int qs, int *lo, int *hi) {
    *lo = 0;
    *hi = Tk;
    if (causal && qs + 1 < *hi) *hi = qs + 1;
    if (window > 0 && qs - window + 1 > *lo) *lo = qs - window + 1;
}

/* Online softmax: fold a block whose max score is `block_max` into the running
 * (max m, denominator l). Returns the factor the running accumulator must be
 * multiplied by; the block's scores are then weighted by exp(s - *m). */
CEPE_HD float cepe_online_softmax_rescale(float *m, float *l, float block_max) {
    float m_new = *m > block_max ? *m : block_max;
    float corr = expf(*m - m_new); /* exp(-inf) = 0 on the first block */
    *l *= corr;
    *m = m_new;
    return corr;
}

/* ------------------------------------------------------------ derivatives
 * Per-element derivatives of the math above, and the fp16 decoding the
 * distillation tables need. */

/* sigmoid(x) through exp(-|x|) (never overflows; vectorizes like cepe_silu). */
CEPE_HD float cepe_sigmoid(float x) {
    const float e = cepe_exp_neg(x >= 0.0f ? -x : x);
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* Backward of cepe_swiglu (out = silu(g) * u) for one element:
 * silu'(g) = σ(g) (1 + g (1 - σ(g))). Adds into *dgate and *dup. */
CEPE_HD void cepe_swiglu_backward(float gate, float up, float dout, float *dgate, float *dup) {
    const float sig = cepe_sigmoid(gate);
    *dgate += dout * up * (sig * (1.0f + gate * (1.0f - sig)));
    *dup += dout * (gate * sig);
}

/* Backward of cepe_rope_rotate: the transpose of [[c, -s], [s, c]], i.e. the
 * same rotation with -s (c, s carry the magnitude, so this is not a division). */
CEPE_HD void cepe_rope_rotate_backward(float *d1, float *d2, float c, float s) {
    cepe_rope_rotate(d1, d2, c, -s);
}

/* IEEE 754 binary16 bits -> float, exactly (subnormals, inf and NaN included). */
CEPE_HD float cepe_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1fu)
        bits = sign | 0x7f800000u | (mant << 13); /* inf / NaN keep their payload */
    else if (exp != 0)
        bits = sign | ((exp + 112u) << 23) | (mant << 13); /* rebias 15 -> 127 */
    else if (mant == 0)
        bits = sign; /* ±0 */
    else {           /* subnormal mant * 2^-24: shift the leading 1 into the implicit bit */
        exp = 113u;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    return cepe_bits_to_float((int)bits);
}

#endif /* CEPE_ELEMENTWISE_H */
