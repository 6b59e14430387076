/* elementwise_backward.h — per-element derivatives of elementwise.h's math,
 * plus the fp16 decoding the distillation tables need. Same rules as
 * elementwise.h: plain C that gcc and nvcc (CEPE_HD = __host__ __device__)
 * both compile, so the CPU tests check the arithmetic the GPU will run. */
#ifndef CEPE_ELEMENTWISE_BACKWARD_H
#define CEPE_ELEMENTWISE_BACKWARD_H

#include <stdint.h>

#include "elementwise.h"

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
CEPE_HD void cepe_rope_rotate_backward(float *d1, float *d2, float c, float s) { cepe_rope_rotate(d1, d2, c, -s); }

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
    else { /* subnormal mant * 2^-24: shift the leading 1 into the implicit bit */
        exp = 113u;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    return cepe_bits_to_float((int)bits);
}

#endif /* CEPE_ELEMENTWISE_BACKWARD_H */
