/* adamw_math.h — the per-element AdamW step, shared by the CPU loop
 * (optim.c) and the CUDA kernel (kernels/cuda_optim.cu). torch.optim.AdamW's single-tensor
 * arithmetic in its order; the scalars are precomputed on the host in double
 * and cast to float where torch casts them (see cepe_adamw_update). */
#ifndef CEPE_ADAMW_MATH_H
#define CEPE_ADAMW_MATH_H

#include "elementwise.h"

/* decay == 1.0f: no weight decay (torch skips the multiply, and so do we,
 * which matters for bit-exactness only through the skipped rounding). */
CEPE_HD void cepe_adamw_elem(float *p, float g, float *m, float *v, float decay, float w1, float b2, float w2,
                             float bc2_sqrt, float neg_step, float eps) {
    float pi = *p;
    if (decay != 1.0f) pi *= decay;
    const float mi = *m + w1 * (g - *m); /* lerp with weight < 0.5, as torch computes it */
    const float vi = *v * b2 + w2 * (g * g);
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    *m = mi;
    *v = vi;
    *p = pi + neg_step * mi / denom; /* addcdiv: self + value * t1 / t2 */
}

#endif /* CEPE_ADAMW_MATH_H */
