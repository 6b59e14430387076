/* backend_cpu.c — the CPU op table, filled from csrc/ops/, plus a
 * device-simulating twin for tests. */
#include <stdint.h>
#include <string.h>

#include "backend.h"
#include "common.h"
#include "ops/elementwise.h"
#include "ops/ops.h"
#include "ops/optim.h"

/* ------------------------------------------------------------ host table */

static void *cpu_alloc(const cepe_backend *be, size_t bytes) {
    (void)be;
    return cepe_calloc(bytes ? bytes : 1, 1);
}
static void cpu_free(const cepe_backend *be, void *p) {
    (void)be;
    cepe_free(p);
}
static int cpu_memcpy(const cepe_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memmove(dst, src, bytes);
    return 0;
}
static int cpu_fill(const cepe_backend *be, void *dst, int byte, size_t bytes) {
    (void)be;
    if (bytes) memset(dst, byte, bytes);
    return 0;
}
static int cpu_sync(const cepe_backend *be, char *msg, size_t msg_len) {
    (void)be;
    if (msg && msg_len) msg[0] = 0;
    return 0;
}

/* The op wrappers are written out, not generated from the op list: each
 * adapts a csrc/ops/ function whose name, argument order or return
 * convention differs (void ops, failures turned into cepe_fail messages). */
static int cpu_embedding(const cepe_backend *be, float *out, const int32_t *ids, const float *wte, int N,
                         int C) {
    (void)be;
    embedding_forward(out, ids, wte, N, C);
    return 0;
}
static int cpu_rmsnorm(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C,
                       float eps, int nt) {
    (void)be;
    rmsnorm_forward(out, inp, w, N, C, eps, nt);
    return 0;
}
static int cpu_matmul(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C,
                      int OC, int accumulate, int nt) {
    (void)be;
    return matmul_forward(out, inp, w, N, C, OC, accumulate, nt);
}
static int cpu_rope_table(const cepe_backend *be, float *cos_t, float *sin_t, const double *pos,
                          const float *inv_freq, int N, int half, float mscale) {
    (void)be;
    rope_table(cos_t, sin_t, pos, inv_freq, N, half, mscale);
    return 0;
}
static int cpu_rope(const cepe_backend *be, float *x, const float *cos_t, const float *sin_t, int N, int nh,
                    int hd, int half, int interleaved, int nt) {
    (void)be;
    rope_forward(x, cos_t, sin_t, N, nh, hd, half, interleaved, nt);
    return 0;
}
static int cpu_attention(const cepe_backend *be, float *out, const float *q, const float *k, const float *v,
                         const uint8_t *key_valid, const attention_shape *s, int nt) {
    (void)be;
    attention_forward(out, q, k, v, key_valid, s, nt);
    return 0;
}
static int cpu_swiglu(const cepe_backend *be, float *out, const float *gate, const float *up, long N,
                      int nt) {
    (void)be;
    swiglu_forward(out, gate, up, N, nt);
    return 0;
}
static int cpu_attention_lse(const cepe_backend *be, float *out, float *lse, const float *q, const float *k,
                             const float *v, const uint8_t *key_valid, const attention_shape *s, int nt) {
    (void)be;
    attention_forward_lse(out, lse, q, k, v, key_valid, s, nt);
    return 0;
}
static int cpu_embedding_backward(const cepe_backend *be, float *dwte, const float *dout, const int32_t *ids,
                                  int N, int C) {
    (void)be;
    embedding_backward(dwte, dout, ids, N, C);
    return 0;
}
static int cpu_rmsnorm_backward(const cepe_backend *be, float *dinp, float *dweight, const float *dout,
                                const float *inp, const float *weight, int N, int C, float eps) {
    (void)be;
    rmsnorm_backward(dinp, dweight, dout, inp, weight, N, C, eps);
    return 0;
}
static int cpu_matmul_backward(const cepe_backend *be, float *dinp, float *dweight, const float *dout,
                               const float *inp, const float *weight, int N, int C, int OC, int accumulate,
                               int nt) {
    (void)be;
    return matmul_backward(dinp, dweight, dout, inp, weight, N, C, OC, accumulate, nt);
}
static int cpu_rope_backward(const cepe_backend *be, float *dx, const float *cos_t, const float *sin_t, int N,
                             int nh, int hd, int half, int interleaved) {
    (void)be;
    rope_backward(dx, cos_t, sin_t, N, nh, hd, half, interleaved);
    return 0;
}
static int cpu_swiglu_backward(const cepe_backend *be, float *dgate, float *dup, const float *dout,
                               const float *gate, const float *up, long N) {
    (void)be;
    swiglu_backward(dgate, dup, dout, gate, up, N);
    return 0;
}
static int cpu_attention_backward(const cepe_backend *be, float *dq, float *dk, float *dv, const float *dout,
                                  const float *q, const float *k, const float *v, const float *out,
                                  const float *lse, const uint8_t *key_valid, const attention_shape *s,
                                  int nt) {
    (void)be;
    if (attention_backward(dq, dk, dv, dout, q, k, v, out, lse, key_valid, s, nt))
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory in the attention backward");
    return 0;
}
static int cpu_cross_entropy(const cepe_backend *be, float *losses, float *dlogits, const float *logits,
                             const int32_t *targets, int N, int V, float dloss_scale) {
    (void)be;
    if (cross_entropy_forward_backward(losses, dlogits, logits, targets, N, V, dloss_scale))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cross-entropy: a target is out of range [0, %d)", V);
    return 0;
}
static int cpu_kl_topk(const cepe_backend *be, float *losses, float *dlogits, const float *logits,
                       const uint16_t *teacher_probs, const int32_t *teacher_index, int N, int V, int K,
                       int mode, float delta, float dloss_scale) {
    (void)be;
    if (kl_topk_forward_backward(losses, dlogits, logits, teacher_probs, teacher_index, N, V, K, mode, delta,
                                 dloss_scale))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "distillation KL: bad mode, K or teacher index");
    return 0;
}
static int cpu_sumsq_chunks(const cepe_backend *be, double *partial, const float *g, size_t n, int nt) {
    (void)be;
    cepe_sumsq_chunks(partial, g, n, nt);
    return 0;
}
static int cpu_scale(const cepe_backend *be, float *x, float s, size_t n, int nt) {
    (void)be;
    cepe_scale(x, s, n, nt);
    return 0;
}
static int cpu_adamw(const cepe_backend *be, float *p, const float *g, float *m, float *v, size_t n,
                     float decay, float w1, float b2, float w2, float bc2_sqrt, float neg_step, float eps,
                     int nt) {
    (void)be;
    const cepe_adamw_scalars_t s = {decay, w1, b2, w2, bc2_sqrt, neg_step, eps};
    cepe_adamw_apply(p, g, m, v, n, &s, nt);
    return 0;
}

/* bf16 weights, the host reference of the CUDA path: activations rounded to
 * bf16, weights widened exactly, an fp32 GEMM (fp32 accumulation). Slow (it
 * widens W at every call): a reference for tests, not a CPU fast path. */
static int cpu_to_bf16(const cepe_backend *be, uint16_t *dst, const float *src, size_t n) {
    (void)be;
    for (size_t i = 0; i < n; i++) dst[i] = cepe_float_to_bf16(src[i]);
    return 0;
}
static int cpu_matmul_bf16(const cepe_backend *be, float *out, const float *inp, const uint16_t *w, int N,
                           int C, int OC, int accumulate, int nt) {
    float *wf = cepe_calloc(cepe_mul_size((size_t)OC, (size_t)C), sizeof(float));
    float *xf = cepe_calloc(cepe_mul_size((size_t)N, (size_t)C), sizeof(float));
    if (!wf || !xf) {
        cepe_free(wf), cepe_free(xf);
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory widening bf16 weights");
    }
    for (size_t i = 0; i < (size_t)OC * C; i++) wf[i] = cepe_bf16_to_float(w[i]);
    for (size_t i = 0; i < (size_t)N * C; i++) xf[i] = cepe_bf16_to_float(cepe_float_to_bf16(inp[i]));
    const int st = cpu_matmul(be, out, xf, wf, N, C, OC, accumulate, nt);
    cepe_free(wf), cepe_free(xf);
    return st;
}

/* The CPU table leaves the bf16 ops NULL: cpu_to_bf16 / cpu_matmul_bf16
 * widen the weights at every call, a reference for the device simulation
 * below, not a CPU path for models. */
#define CPU_OP(name, params, args) .name = cpu_##name,

/* (not clang-formatted: it cannot see the op lists' trailing commas) */
/* clang-format off */
static const cepe_backend cpu_backend = {
    .abi = CEPE_BACKEND_ABI,
    .name = "cpu",
    .device = 0,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .fill = cpu_fill,
    .sync = cpu_sync,
    CEPE_FORWARD_OPS(CPU_OP)
    CEPE_TRAINING_OPS(CPU_OP)
    CEPE_OPTIMIZER_OPS(CPU_OP)
};
/* clang-format on */

const cepe_backend *cepe_backend_cpu(void) { return &cpu_backend; }

/* ------------------------------------------------------ device simulation
 * "Device" pointers are real allocations moved into the non-canonical half
 * of the address space (bit 62 set): host code that dereferences one faults
 * at once, while pointer arithmetic on them works as on a GPU's. The ops
 * move them back before calling the CPU ops. */

#define SIM_TAG ((uintptr_t)1 << 62)

static void *sim_tag(void *p) { return p ? (void *)((uintptr_t)p + SIM_TAG) : NULL; }
static void *sim_host(const void *p) { return p ? (void *)((uintptr_t)p - SIM_TAG) : NULL; }
#define H(p) sim_host(p)

static void *sim_alloc(const cepe_backend *be, size_t bytes) { return sim_tag(cpu_alloc(be, bytes)); }
static void sim_free(const cepe_backend *be, void *p) { cpu_free(be, sim_host(p)); }
static int sim_upload(const cepe_backend *be, void *dst, const void *src, size_t bytes) {
    return cpu_memcpy(be, H(dst), src, bytes);
}
static int sim_download(const cepe_backend *be, void *dst, const void *src, size_t bytes) {
    return cpu_memcpy(be, dst, H(src), bytes);
}
static int sim_copy(const cepe_backend *be, void *dst, const void *src, size_t bytes) {
    return cpu_memcpy(be, H(dst), H(src), bytes);
}
static int sim_fill(const cepe_backend *be, void *dst, int byte, size_t bytes) {
    return cpu_fill(be, H(dst), byte, bytes);
}

/* Every op: its buffers moved back to host addresses, then the CPU op. */
#define BUF_W(p) H(p)
#define BUF_R(p) H(p)
#define HOST(x) x
#define SHAPE(s) s
#define SIM_OP(name, params, args)                                                                           \
    static int sim_##name(const cepe_backend *be, CEPE_UNPACK params) {                                      \
        return cpu_##name(be, CEPE_UNPACK args);                                                             \
    }
CEPE_BACKEND_OPS(SIM_OP)
#undef BUF_W
#undef BUF_R
#undef HOST
#undef SHAPE

static void sim_destroy(cepe_backend *be) { cepe_free(be); }

#define SIM_TABLE_OP(name, params, args) .name = sim_##name,

cepe_backend *cepe_backend_cpu_device_sim(void) {
    cepe_backend *be = cepe_calloc(1, sizeof *be);
    if (!be) return NULL;
    /* clang-format off */
    *be = (cepe_backend){
        .abi = CEPE_BACKEND_ABI,
        .name = "cpu-device-sim",
        .device = 1,
        .alloc = sim_alloc,
        .free = sim_free,
        .upload = sim_upload,
        .download = sim_download,
        .copy = sim_copy,
        .fill = sim_fill,
        .sync = cpu_sync,
        CEPE_BACKEND_OPS(SIM_TABLE_OP)
        .destroy = sim_destroy,
    };
    /* clang-format on */
    return be;
}
