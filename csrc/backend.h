/* backend.h — the op table a backend fills. Model code (csrc/model/) is
 * written once against it; the CPU backend fills it from csrc/ops/, the CUDA
 * backend (kernels/) will fill it with device kernels. Pointers passed to the
 * ops are in the backend's memory space. Ops return 0 on success. */
#ifndef CEPE_BACKEND_H
#define CEPE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "ops/ops.h"

typedef struct cepe_backend {
    const char *name;
    void *(*alloc)(size_t bytes); /* zero-filled, NULL on failure */
    void (*free)(void *p);

    void (*embedding)(float *out, const int32_t *ids, const float *wte, int N, int C);
    void (*rmsnorm)(float *out, const float *inp, const float *w, int N, int C, float eps, int nt);
    int (*matmul)(float *out, const float *inp, const float *w, int N, int C, int OC, int accumulate,
                  int nt);
    void (*rope_table)(float *cos_t, float *sin_t, const double *pos, const float *inv_freq, int N,
                       int half, float mscale);
    void (*rope)(float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
                 int interleaved, int nt);
    void (*attention)(float *out, const float *q, const float *k, const float *v,
                      const uint8_t *key_valid, const attention_shape *s, int nt);
    void (*swiglu)(float *out, const float *gate, const float *up, long N, int nt);
} cepe_backend;

const cepe_backend *cepe_backend_cpu(void);

#endif /* CEPE_BACKEND_H */
