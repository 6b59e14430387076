/* backend.h — the op table a backend fills. Model and training code
 * (csrc/model/, csrc/train/) is written once against it; the CPU backend
 * (backend_cpu.c) fills it from csrc/ops/, the CUDA backend (kernels/,
 * built into the optional cepe_cuda extension) with device kernels and
 * cuBLAS, and hands its table to the core through a PyCapsule.
 *
 * Memory spaces. Every pointer an op receives is in the backend's memory
 * space: when `device` is 1 host code must never read or write it directly,
 * only through upload / download / copy / fill. Scalars and the attention
 * shape are passed by value and live on the host.
 *
 * Errors. Ops may run asynchronously (CUDA queues them on the backend's
 * stream). An op returns nonzero when it fails at once (a bad argument, a
 * launch or cuBLAS error); a failure found later is kept and reported by the
 * next `sync`. Either way the message comes from `sync`, which also waits
 * for queued work: callers check it at the end of each public call.
 *
 * Every op takes the backend itself first (the CUDA backend keeps its
 * stream, cuBLAS handle and scratch in `state`, one per model), and keeps the
 * CPU op's arguments, in order, after it. n_threads is the CPU's OpenMP team
 * size; device backends ignore it. */
#ifndef CEPE_BACKEND_H
#define CEPE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "cepe.h"
#include "ops/ops.h"
#include "ops/optim.h"

/* Bumped whenever the table's layout changes: cepe_c refuses a table built
 * against another layout (the two extensions are built separately). */
#define CEPE_BACKEND_ABI 1

/* The op list, once: X(name, (parameters), (arguments)). The parameters
 * follow the backend itself in every op; the arguments name them again,
 * each marked with where it lives, so wrappers can be generated:
 *   BUF_W(p)  a buffer in the backend's memory the op writes or adds into
 *   BUF_R(p)  a buffer in the backend's memory the op only reads
 *   HOST(x)   a scalar passed by value
 *   SHAPE(s)  the attention shape, a host struct passed by pointer
 * A user of the arguments defines the four markers around the expansion.
 * Users: the struct below, the CPU and device-simulating tables
 * (backend_cpu.c), the CUDA table (kernels/cuda_backend.cu, prototypes in
 * kernels/cuda_common.cuh) and cepe_c's op bindings (cepe_c/ops_bindings.c).
 * Adding an op is one line here plus its implementations. */

/* ---- forward ops (csrc/ops/ops.h) ---- */
#define CEPE_FORWARD_OPS(X)                                                                                  \
    X(embedding, (float *out, const int32_t *ids, const float *wte, int N, int C),                           \
      (BUF_W(out), BUF_R(ids), BUF_R(wte), HOST(N), HOST(C)))                                                \
    X(rmsnorm, (float *out, const float *inp, const float *w, int N, int C, float eps, int nt),              \
      (BUF_W(out), BUF_R(inp), BUF_R(w), HOST(N), HOST(C), HOST(eps), HOST(nt)))                             \
    X(matmul, (float *out, const float *inp, const float *w, int N, int C, int OC, int accumulate, int nt),  \
      (BUF_W(out), BUF_R(inp), BUF_R(w), HOST(N), HOST(C), HOST(OC), HOST(accumulate), HOST(nt)))            \
    X(rope_table,                                                                                            \
      (float *cos_t, float *sin_t, const double *pos, const float *inv_freq, int N, int half, float mscale), \
      (BUF_W(cos_t), BUF_W(sin_t), BUF_R(pos), BUF_R(inv_freq), HOST(N), HOST(half), HOST(mscale)))          \
    X(rope,                                                                                                  \
      (float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half, int interleaved,   \
       int nt),                                                                                              \
      (BUF_W(x), BUF_R(cos_t), BUF_R(sin_t), HOST(N), HOST(nh), HOST(hd), HOST(half), HOST(interleaved),     \
       HOST(nt)))                                                                                            \
    X(attention,                                                                                             \
      (float *out, const float *q, const float *k, const float *v, const uint8_t *key_valid,                 \
       const attention_shape *s, int nt),                                                                    \
      (BUF_W(out), BUF_R(q), BUF_R(k), BUF_R(v), BUF_R(key_valid), SHAPE(s), HOST(nt)))                      \
    X(swiglu, (float *out, const float *gate, const float *up, long N, int nt),                              \
      (BUF_W(out), BUF_R(gate), BUF_R(up), HOST(N), HOST(nt)))

/* ---- training ops (the backward half of csrc/ops/ops.h; same shapes and the same
 * accumulate-into-gradient convention). cross_entropy's targets are
 * range-checked by the caller (host side). ---- */
#define CEPE_TRAINING_OPS(X)                                                                                 \
    X(attention_lse,                                                                                         \
      (float *out, float *lse, const float *q, const float *k, const float *v, const uint8_t *key_valid,     \
       const attention_shape *s, int nt),                                                                    \
      (BUF_W(out), BUF_W(lse), BUF_R(q), BUF_R(k), BUF_R(v), BUF_R(key_valid), SHAPE(s), HOST(nt)))          \
    X(embedding_backward, (float *dwte, const float *dout, const int32_t *ids, int N, int C),                \
      (BUF_W(dwte), BUF_R(dout), BUF_R(ids), HOST(N), HOST(C)))                                              \
    X(rmsnorm_backward,                                                                                      \
      (float *dinp, float *dweight, const float *dout, const float *inp, const float *weight, int N, int C,  \
       float eps),                                                                                           \
      (BUF_W(dinp), BUF_W(dweight), BUF_R(dout), BUF_R(inp), BUF_R(weight), HOST(N), HOST(C), HOST(eps)))    \
    X(matmul_backward,                                                                                       \
      (float *dinp, float *dweight, const float *dout, const float *inp, const float *weight, int N, int C,  \
       int OC, int accumulate, int nt),                                                                      \
      (BUF_W(dinp), BUF_W(dweight), BUF_R(dout), BUF_R(inp), BUF_R(weight), HOST(N), HOST(C), HOST(OC),      \
       HOST(accumulate), HOST(nt)))                                                                          \
    X(rope_backward,                                                                                         \
      (float *dx, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half, int interleaved), \
      (BUF_W(dx), BUF_R(cos_t), BUF_R(sin_t), HOST(N), HOST(nh), HOST(hd), HOST(half), HOST(interleaved)))   \
    X(swiglu_backward,                                                                                       \
      (float *dgate, float *dup, const float *dout, const float *gate, const float *up, long N),             \
      (BUF_W(dgate), BUF_W(dup), BUF_R(dout), BUF_R(gate), BUF_R(up), HOST(N)))                              \
    X(attention_backward,                                                                                    \
      (float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k, const float *v,   \
       const float *out, const float *lse, const uint8_t *key_valid, const attention_shape *s, int nt),      \
      (BUF_W(dq), BUF_W(dk), BUF_W(dv), BUF_R(dout), BUF_R(q), BUF_R(k), BUF_R(v), BUF_R(out), BUF_R(lse),   \
       BUF_R(key_valid), SHAPE(s), HOST(nt)))                                                                \
    X(cross_entropy,                                                                                         \
      (float *losses, float *dlogits, const float *logits, const int32_t *targets, int N, int V,             \
       float dloss_scale),                                                                                   \
      (BUF_W(losses), BUF_W(dlogits), BUF_R(logits), BUF_R(targets), HOST(N), HOST(V), HOST(dloss_scale)))   \
    X(kl_topk,                                                                                               \
      (float *losses, float *dlogits, const float *logits, const uint16_t *teacher_probs,                    \
       const int32_t *teacher_index, int N, int V, int K, int mode, float delta, float dloss_scale),         \
      (BUF_W(losses), BUF_W(dlogits), BUF_R(logits), BUF_R(teacher_probs), BUF_R(teacher_index), HOST(N),    \
       HOST(V), HOST(K), HOST(mode), HOST(delta), HOST(dloss_scale)))

/* ---- optimizer over flat fp32 buffers (csrc/ops/optim.h) ----
 * sumsq_chunks: partial[c] = Σ g² over chunk c of CEPE_NORM_CHUNK elements,
 * in double; partial holds ceil(n / CEPE_NORM_CHUNK) doubles.
 * adamw: one AdamW step, torch's single-tensor arithmetic: the scalars are
 * precomputed on the host (cepe_adamw_scalars); decay == 1 means no weight
 * decay. */
#define CEPE_OPTIMIZER_OPS(X)                                                                                \
    X(sumsq_chunks, (double *partial, const float *g, size_t n, int nt),                                     \
      (BUF_W(partial), BUF_R(g), HOST(n), HOST(nt)))                                                         \
    X(scale, (float *x, float s, size_t n, int nt), (BUF_W(x), HOST(s), HOST(n), HOST(nt)))                  \
    X(adamw,                                                                                                 \
      (float *p, const float *g, float *m, float *v, size_t n, float decay, float w1, float b2, float w2,    \
       float bc2_sqrt, float neg_step, float eps, int nt),                                                   \
      (BUF_W(p), BUF_R(g), BUF_W(m), BUF_W(v), HOST(n), HOST(decay), HOST(w1), HOST(b2), HOST(w2),           \
       HOST(bc2_sqrt), HOST(neg_step), HOST(eps), HOST(nt)))

/* ---- bf16 weights: optional, NULL where unsupported ----
 * to_bf16: dst (n) = bf16(src), round to nearest even.
 * matmul_bf16: matmul with bf16 weights (OC, C): the activations are rounded
 * to bf16, products are accumulated in fp32, out stays fp32. */
#define CEPE_BF16_OPS(X)                                                                                     \
    X(to_bf16, (uint16_t *dst, const float *src, size_t n), (BUF_W(dst), BUF_R(src), HOST(n)))               \
    X(matmul_bf16,                                                                                           \
      (float *out, const float *inp, const uint16_t *w, int N, int C, int OC, int accumulate, int nt),       \
      (BUF_W(out), BUF_R(inp), BUF_R(w), HOST(N), HOST(C), HOST(OC), HOST(accumulate), HOST(nt)))

/* Every op, in table order. */
#define CEPE_BACKEND_OPS(X) CEPE_FORWARD_OPS(X) CEPE_TRAINING_OPS(X) CEPE_OPTIMIZER_OPS(X) CEPE_BF16_OPS(X)

/* The parameters (or arguments) of a list entry without their parentheses. */
#define CEPE_UNPACK(...) __VA_ARGS__

#define CEPE_OP_FIELD(name, params, args) int (*name)(const cepe_backend *be, CEPE_UNPACK params);

struct cepe_backend {
    int abi;          /* CEPE_BACKEND_ABI */
    const char *name; /* "cpu", "cuda" */
    int device;       /* 1: op pointers are device memory (see above) */
    void *state;      /* backend-private */

    /* ---- memory ---- */
    void *(*alloc)(const cepe_backend *be, size_t bytes); /* zero-filled; NULL on failure */
    void (*free)(const cepe_backend *be, void *p);        /* NULL is a no-op */
    int (*upload)(const cepe_backend *be, void *dst, const void *host_src, size_t bytes);
    int (*download)(const cepe_backend *be, void *host_dst, const void *src, size_t bytes); /* waits */
    int (*copy)(const cepe_backend *be, void *dst, const void *src, size_t bytes);
    int (*fill)(const cepe_backend *be, void *dst, int byte, size_t bytes);
    /* Waits for queued work. Returns 0, or the first failure since the last
     * sync (a CEPE_ERR_* code) with its message written to msg. */
    int (*sync)(const cepe_backend *be, char *msg, size_t msg_len);

    /* ---- the ops (the list above) ---- */
    CEPE_BACKEND_OPS(CEPE_OP_FIELD)

    /* Frees this backend instance and everything it owns (NULL for the
     * static CPU table). */
    void (*destroy)(cepe_backend *be);
};

/* The CPU table: a static instance, shared by every model. */
const cepe_backend *cepe_backend_cpu(void);

/* A test-only CPU backend that behaves like a device: its buffers are
 * separate allocations reached only through upload / download, so the CPU
 * test suite checks that the model code moves data across the boundary
 * exactly where a GPU needs it. Free it with its destroy. NULL on OOM. */
cepe_backend *cepe_backend_cpu_device_sim(void);

#endif /* CEPE_BACKEND_H */
