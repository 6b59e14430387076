/* adamw.c — gradient-norm clipping and the AdamW update over flat fp32
 * buffers (llm.c's gpt2_update), written to follow torch.optim.AdamW
 * (single-tensor CPU path) and torch.nn.utils.clip_grad_norm_ operation by
 * operation: the scalars in double, cast to float where torch casts them,
 * the per-element arithmetic in float in torch's order. */
#include <math.h>

#include "train.h"

double cepe_grad_norm(const float *g, size_t n, int n_threads) {
    /* Chunk sums in double, then added in chunk order: the same bits for
     * any thread count (ordered reduction by hand, not OpenMP's). */
    double total = 0.0, partial[64];
    for (size_t lo = 0; lo < n; lo += (size_t)64 * CEPE_NORM_CHUNK) {
        const size_t len = n - lo < (size_t)64 * CEPE_NORM_CHUNK ? n - lo : (size_t)64 * CEPE_NORM_CHUNK;
        cepe_sumsq_chunks(partial, g + lo, len, n_threads);
        for (size_t c = 0; c < (len + CEPE_NORM_CHUNK - 1) / CEPE_NORM_CHUNK; c++) total += partial[c];
    }
    return sqrt(total);
}

double cepe_clip_grad_norm(float *g, size_t n, double max_norm, int n_threads) {
    const double norm = cepe_grad_norm(g, n, n_threads);
    if (!(max_norm > 0.0)) return norm; /* clipping off */
    /* torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1, in
     * float32 (the norm is a float32 tensor there). */
    const float coef = (float)(max_norm / ((double)(float)norm + 1e-6));
    if (coef < 1.0f) cepe_scale(g, coef, n, n_threads);
    return norm;
}

void cepe_adamw_scalars(double lr, const cepe_adamw_config *h, double weight_decay, long t,
                        cepe_adamw_scalars_t *o) {
    /* torch: param.mul_(1 - lr * wd); exp_avg.lerp_(grad, 1 - beta1);
     * exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2);
     * denom = exp_avg_sq.sqrt() / sqrt(1 - beta2^t) + eps;
     * param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1^t)). */
    o->decay = weight_decay != 0.0 ? (float)(1.0 - lr * weight_decay) : 1.0f;
    o->w1 = (float)(1.0 - h->beta1);
    o->b2 = (float)h->beta2;
    o->w2 = (float)(1.0 - h->beta2);
    o->bc2_sqrt = (float)sqrt(1.0 - pow(h->beta2, (double)t));
    o->neg_step = (float)(-lr / (1.0 - pow(h->beta1, (double)t)));
    o->eps = (float)h->eps;
}

void cepe_adamw_update(float *p, const float *g, float *m, float *v, size_t n, double lr,
                       const cepe_adamw_config *h, double weight_decay, long t, int n_threads) {
    cepe_adamw_scalars_t s;
    cepe_adamw_scalars(lr, h, weight_decay, t, &s);
    cepe_adamw_apply(p, g, m, v, n, &s, n_threads);
}
