/* ops.h — the CPU reference ops (llm.c style: shapes in the signatures).
 * Each op family has its own file in csrc/ops/; later issues add the
 * backward next to each forward. n_threads bounds the OpenMP team. */
#ifndef CEPE_OPS_H
#define CEPE_OPS_H

#include <stdint.h>

/* For the accessors of _Thread_local scratch (attention.c, attention_backward.c):
 * if GCC sees every caller pass &tls_scratch it specialises them on it, and
 * under -fPIC's general-dynamic TLS model the specialised loops then call
 * __tls_get_addr for every element. An opaque accessor returns the address
 * once per task instead. */
#if defined(__GNUC__) && !defined(__clang__)
#define CEPE_OPAQUE __attribute__((noipa))
#else
#define CEPE_OPAQUE __attribute__((noinline))
#endif
/* A small hot loop kept out of line so the vectorizer sees it alone. */
#define CEPE_NOINLINE __attribute__((noinline))

/* out (N, C) = wte[ids] ; ids already range-checked by the caller */
void embedding_forward(float *out, const int32_t *ids, const float *wte, int N, int C);

/* out (N, C) = inp / rms(inp) * weight */
void rmsnorm_forward(float *out, const float *inp, const float *weight, int N, int C, float eps,
                     int n_threads);

/* out (N, OC) = inp (N, C) · weight (OC, C)ᵀ  (+ out when accumulate).
 * The OC columns are split across n_threads OpenMP threads, each calling a
 * single-threaded BLAS: one thread pool for the whole engine, so BLAS workers
 * never spin against the OpenMP team on the same cores. */
int matmul_forward(float *out, const float *inp, const float *weight, int N, int C, int OC,
                   int accumulate, int n_threads);

/* cos/sin (N, rot/2) = mscale * cos/sin(pos * inv_freq), angles in double. */
void rope_table(float *cos_out, float *sin_out, const double *pos, const float *inv_freq, int N,
                int half, float mscale);
/* x (N, nh, hd) rotated in place over its first 2*half dims; pairs
 * (j, j+half) when interleaved == 0 (HF), (2j, 2j+1) when 1 (Meta, GGUF). */
void rope_forward(float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd,
                  int half, int interleaved, int n_threads);

/* Attention with an online softmax over key blocks; never holds more than a
 * block of scores per query. Queries of batch row b are rows
 * q + b*q_bstride (+ t*q_rstride); keys/values likewise with kv strides.
 *  out   (B, Tq, H*hd) contiguous
 *  q     (B, Tq, H*hd) (row stride q_rstride, batch stride q_bstride)
 *  k, v  (B, Tk, KVH*hd) (row stride kv_rstride, batch stride kv_bstride)
 *  key_valid (B, Tk) with batch stride valid_bstride, 1 = may be attended; NULL = all
 *  causal: query t (slot q_offset + t) sees keys j <= q_offset + t
 *  window: > 0 also requires q_offset + t - j < window
 * Rows with no visible key get a zero output. */
typedef struct {
    int B, Tq, Tk, H, KVH, hd;
    long q_rstride, q_bstride, kv_rstride, kv_bstride, valid_bstride;
    int causal, q_offset, window;
    float scale;
} attention_shape;
void attention_forward(float *out, const float *q, const float *k, const float *v,
                       const uint8_t *key_valid, const attention_shape *s, int n_threads);

/* out (N) = silu(gate) * up */
void swiglu_forward(float *out, const float *gate, const float *up, long N, int n_threads);

#endif /* CEPE_OPS_H */
