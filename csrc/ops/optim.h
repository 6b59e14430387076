/* optim.h — the optimizer's elementwise loops over flat fp32 buffers
 * (optim.c): the gradient norm's partial sums, scaling, and the AdamW step
 * whose per-step scalars the training code computes (train/adamw.c). They
 * are ops like the others: backend tables fill their optimizer entries with
 * them (CPU) or with kernels running the same per-element math (CUDA). */
#ifndef CEPE_OPTIM_H
#define CEPE_OPTIM_H

#include <stddef.h>

/* Elements per reduction chunk of the gradient norm: partial sums over fixed
 * chunks, added in a fixed order, make the norm independent of the thread
 * count (resume must be bit-exact whatever n_threads is). */
#define CEPE_NORM_CHUNK 16384

/* AdamW's per-step scalars, computed on the host in double and cast to float
 * as torch casts them (cepe_adamw_scalars in train/adamw.c). */
typedef struct {
    float decay, w1, b2, w2, bc2_sqrt, neg_step, eps;
} cepe_adamw_scalars_t;

/* partial[c] = Σ g² over chunk c (CEPE_NORM_CHUNK elements), in double. */
void cepe_sumsq_chunks(double *partial, const float *g, size_t n, int n_threads);
/* x (n) *= s */
void cepe_scale(float *x, float s, size_t n, int n_threads);
/* One AdamW step on n parameters (adamw_math.h's cepe_adamw_elem). */
void cepe_adamw_apply(float *p, const float *g, float *m, float *v, size_t n, const cepe_adamw_scalars_t *s,
                      int n_threads);

#endif /* CEPE_OPTIM_H */
