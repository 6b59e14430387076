/* embedding.c — token embedding lookup. */
#include <string.h>

#include "ops.h"

void embedding_forward(float *out, const int32_t *ids, const float *wte, int N, int C) {
    for (int i = 0; i < N; i++) memcpy(out + (long)i * C, wte + (long)ids[i] * C, sizeof(float) * (size_t)C);
}
