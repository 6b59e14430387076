/* embedding.c — token embedding lookup. */

#include <string.h>

#include "ops.h"

void embedding_forward(float *out, const int32_t *ids, const float *wte, int N, int C) {
    for (int i = 0; i < N; i++) memcpy(out + (long)i * C, wte + (long)ids[i] * C, sizeof(float) * (size_t)C);
}

/* ------------------------------------------------------------ backward */

/* The backward of embedding_forward. */
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
