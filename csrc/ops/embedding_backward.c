/* embedding_backward.c — backward of embedding_forward (embedding.c). */
#include "ops_backward.h"

void embedding_backward(float *dwte, const float *dout, const int32_t *ids, int N, int C) {
    /* Serial over rows: a token that appears twice adds twice into one row,
     * which a row-parallel loop would race on. */
    for (int i = 0; i < N; i++) {
        float *d = dwte + (long)ids[i] * C;
        const float *g = dout + (long)i * C;
#pragma omp simd
        for (int j = 0; j < C; j++) d[j] += g[j];
    }
}
