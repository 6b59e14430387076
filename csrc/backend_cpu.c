/* backend_cpu.c — the CPU op table, filled from csrc/ops/. */
#include "backend.h"
#include "common.h"

static void *cpu_alloc(size_t bytes) { return cepe_calloc(bytes, 1); }

static const cepe_backend cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cepe_free,
    .embedding = embedding_forward,
    .rmsnorm = rmsnorm_forward,
    .matmul = matmul_forward,
    .rope_table = rope_table,
    .rope = rope_forward,
    .attention = attention_forward,
    .swiglu = swiglu_forward,
};

const cepe_backend *cepe_backend_cpu(void) { return &cpu_backend; }
