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

#include "ops/ops.h"

/* Bumped whenever the table's layout changes: cepe_c refuses a table built
 * against another layout (the two extensions are built separately). */
#define CEPE_BACKEND_ABI 1

/* Elements per reduction chunk of the gradient norm: partial sums over fixed
 * chunks, added in a fixed order, make the norm independent of the thread
 * count (resume must be bit-exact whatever n_threads is). */
#define CEPE_NORM_CHUNK 16384

typedef struct cepe_backend cepe_backend;

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

    /* ---- forward ops (csrc/ops/ops.h) ---- */
    int (*embedding)(const cepe_backend *be, float *out, const int32_t *ids, const float *wte, int N, int C);
    int (*rmsnorm)(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C, float eps,
                   int nt);
    int (*matmul)(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C, int OC,
                  int accumulate, int nt);
    int (*rope_table)(const cepe_backend *be, float *cos_t, float *sin_t, const double *pos, const float *inv_freq,
                      int N, int half, float mscale);
    int (*rope)(const cepe_backend *be, float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd,
                int half, int interleaved, int nt);
    int (*attention)(const cepe_backend *be, float *out, const float *q, const float *k, const float *v,
                     const uint8_t *key_valid, const attention_shape *s, int nt);
    int (*swiglu)(const cepe_backend *be, float *out, const float *gate, const float *up, long N, int nt);

    /* ---- training ops (csrc/ops/ops_backward.h; same shapes and the same
     * accumulate-into-gradient convention) ---- */
    int (*attention_lse)(const cepe_backend *be, float *out, float *lse, const float *q, const float *k,
                         const float *v, const uint8_t *key_valid, const attention_shape *s, int nt);
    int (*embedding_backward)(const cepe_backend *be, float *dwte, const float *dout, const int32_t *ids, int N,
                              int C);
    int (*rmsnorm_backward)(const cepe_backend *be, float *dinp, float *dweight, const float *dout,
                            const float *inp, const float *weight, int N, int C, float eps);
    int (*matmul_backward)(const cepe_backend *be, float *dinp, float *dweight, const float *dout, const float *inp,
                           const float *weight, int N, int C, int OC, int accumulate, int nt);
    int (*rope_backward)(const cepe_backend *be, float *dx, const float *cos_t, const float *sin_t, int N, int nh,
                         int hd, int half, int interleaved);
    int (*swiglu_backward)(const cepe_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                           const float *up, long N);
    int (*attention_backward)(const cepe_backend *be, float *dq, float *dk, float *dv, const float *dout,
                              const float *q, const float *k, const float *v, const float *out, const float *lse,
                              const uint8_t *key_valid, const attention_shape *s, int nt);
    /* targets are range-checked by the caller (host side) */
    int (*cross_entropy)(const cepe_backend *be, float *losses, float *dlogits, const float *logits,
                         const int32_t *targets, int N, int V, float dloss_scale);
    int (*kl_topk)(const cepe_backend *be, float *losses, float *dlogits, const float *logits,
                   const uint16_t *teacher_probs_fp16, const int32_t *teacher_index, int N, int V, int K, int mode,
                   float delta, float dloss_scale);

    /* ---- optimizer over flat fp32 buffers (csrc/train/adamw.c) ---- */
    /* partial[c] = Σ g² over chunk c of CEPE_NORM_CHUNK elements, in double;
     * partial holds ceil(n / CEPE_NORM_CHUNK) doubles in the backend's space. */
    int (*sumsq_chunks)(const cepe_backend *be, double *partial, const float *g, size_t n, int nt);
    int (*scale)(const cepe_backend *be, float *x, float s, size_t n, int nt);
    /* One AdamW step, torch's single-tensor arithmetic (adamw.c): the scalars
     * are precomputed on the host. decay == 1 means no weight decay. */
    int (*adamw)(const cepe_backend *be, float *p, const float *g, float *m, float *v, size_t n, float decay,
                 float w1, float b2, float w2, float bc2_sqrt, float neg_step, float eps, int nt);

    /* ---- bf16 weights (optional; NULL where unsupported) ---- */
    /* dst (n) = bf16(src), round to nearest even; both in the backend's space. */
    int (*to_bf16)(const cepe_backend *be, uint16_t *dst, const float *src, size_t n);
    /* matmul with bf16 weights (OC, C): the activations are rounded to bf16,
     * products are accumulated in fp32, out stays fp32. */
    int (*matmul_bf16)(const cepe_backend *be, float *out, const float *inp, const uint16_t *w, int N, int C,
                       int OC, int accumulate, int nt);

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
