/* optim.c — the optimizer's elementwise loops (optim.h). */
#include "optim.h"

#include "adamw_math.h"

void cepe_sumsq_chunks(double *partial, const float *g, size_t n, int n_threads) {
    const long n_chunks = (long)((n + CEPE_NORM_CHUNK - 1) / CEPE_NORM_CHUNK);
#pragma omp parallel for num_threads(n_threads) if (n_chunks > 1 && n > (size_t)1 << 17)
    for (long c = 0; c < n_chunks; c++) {
        const size_t lo = (size_t)c * CEPE_NORM_CHUNK;
        const size_t hi = lo + CEPE_NORM_CHUNK < n ? lo + CEPE_NORM_CHUNK : n;
        double s = 0.0;
        for (size_t i = lo; i < hi; i++) s += (double)g[i] * (double)g[i];
        partial[c] = s;
    }
}

void cepe_scale(float *x, float s, size_t n, int n_threads) {
#pragma omp parallel for simd num_threads(n_threads) if (n > (size_t)1 << 16)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

void cepe_adamw_apply(float *p, const float *g, float *m, float *v, size_t n, const cepe_adamw_scalars_t *s,
                      int n_threads) {
#pragma omp parallel for simd num_threads(n_threads) if (n > (size_t)1 << 16)
    for (size_t i = 0; i < n; i++)
        cepe_adamw_elem(&p[i], g[i], &m[i], &v[i], s->decay, s->w1, s->b2, s->w2, s->bc2_sqrt, s->neg_step,
                        s->eps);
}
