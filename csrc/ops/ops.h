/* ops.h — the CPU reference ops (llm.c style: shapes in the signatures).
 * Each op family has one file in csrc/ops/ holding its forward and its
 * backward. n_threads bounds the OpenMP team. */
#ifndef CEPE_OPS_H
#define CEPE_OPS_H

#include <stdint.h>

/* For the accessors of _Thread_local scratch (attention.c):
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
int matmul_forward(float *out, const float *inp, const float *weight, int N, int C, int OC, int accumulate,
                   int n_threads);

/* cos/sin (N, rot/2) = mscale * cos/sin(pos * inv_freq), angles in double. */
void rope_table(float *cos_out, float *sin_out, const double *pos, const float *inv_freq, int N, int half,
                float mscale);
/* x (N, nh, hd) rotated in place over its first 2*half dims; pairs
 * (j, j+half) when interleaved == 0 (HF), (2j, 2j+1) when 1 (Meta, GGUF). */
void rope_forward(float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
                  int interleaved, int n_threads);

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
void attention_forward(float *out, const float *q, const float *k, const float *v, const uint8_t *key_valid,
                       const attention_shape *s, int n_threads);

/* out (N) = silu(gate) * up */
void swiglu_forward(float *out, const float *gate, const float *up, long N, int n_threads);

/* ------------------------------------------------------------ backward
 * The backward of every op (in its forward's file) and the training losses
 * (loss.c).
 *
 * Convention for gradient outputs, as in llm.c: every d* buffer is
 * ACCUMULATED into (+=), so a tensor used twice (a residual stream, a tied
 * embedding) just receives both contributions; the caller zeroes gradients
 * once per step. Exceptions, spelled out below: matmul_backward's dinp takes
 * an `accumulate` flag (0 = overwrite, so a caller can skip zeroing a large
 * buffer), rope_backward works in place, and the loss values are written. */

/* Target value that contributes neither loss nor gradient (PyTorch's). */
#define CEPE_IGNORE_INDEX (-100)

/* Modes of the CEPED KL (spec CEPE.md §6.4). */
#define CEPE_KL_SMOOTH 0 /* smooth_δ: p, q <- (x + δ) / (1 + (K+1)δ) over all K+1 buckets */
#define CEPE_KL_DROP 1   /* drop: the remainder bucket is dropped; unnormalized K-vectors */

/* embedding_forward's backward. dwte (V, C) += scatter of dout (N, C) rows
 * to rows ids (N); ids already range-checked by the caller. */
void embedding_backward(float *dwte, const float *dout, const int32_t *ids, int N, int C);

/* rmsnorm_forward's backward, for out = inp * rms_inv(inp) * weight.
 * dinp (N, C) += ; dweight (C) += ; either may be NULL (frozen weight:
 * dweight = NULL, gradients still flow to dinp). dout, inp (N, C), weight (C). */
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                      int N, int C, float eps);

/* matmul_forward's backward, for out (N, OC) = inp (N, C) · weight (OC, C)ᵀ.
 *  dinp (N, C)     = dout · weight   (+= when accumulate), or NULL
 *  dweight (OC, C) += doutᵀ · inp, or NULL (frozen layer)
 * Threads as matmul_forward: OpenMP over column slices, single-threaded BLAS
 * inside. Returns 0. */
int matmul_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                    int N, int C, int OC, int accumulate, int n_threads);

/* rope_forward's backward, in place: dx (N, nh, hd) is the gradient of the
 * rotated x on entry and of the unrotated x on return. The rotation matrix is
 * [[c, -s], [s, c]] with the magnitude inside c, s (cos_t, sin_t (N, half)),
 * so the backward multiplies by its transpose [[c, s], [-s, c]]: the inverse
 * rotation, scaled by the magnitude rather than divided by it. */
void rope_backward(float *dx, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
                   int interleaved);

/* swiglu_forward's backward, for out = silu(gate) * up, all (N).
 * dgate += dout * up * silu'(gate); dup += dout * silu(gate). */
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, long N);

/* attention_forward (the same code), also returning lse (B, Tq, H): the
 * log-sum-exp of each query's scaled, masked scores (-inf where no key is
 * visible), which is all the backward needs to rebuild the probabilities
 * block by block. out may be NULL (lse only). Same shapes, masks, memory
 * bound and hd <= 256 limit as attention_forward (the lse-only pass has no hd
 * limit). */
void attention_forward_lse(float *out, float *lse, const float *q, const float *k, const float *v,
                           const uint8_t *key_valid, const attention_shape *s, int n_threads);

/* attention_forward's backward (FlashAttention-2 style: scores are
 * recomputed per 64x64 block from lse and D = rowsum(dout ∘ out), so memory
 * is O(block) per thread, never O(Tq·Tk)).
 *  dq   (B, Tq, H*hd)   laid out like q (q_rstride, q_bstride), +=, or NULL
 *  dk, dv (B, Tk, KVH*hd) laid out like k, v (kv strides), +=, or NULL;
 *       GQA: the sum over the H/KVH query heads sharing a kv head
 *  dout, out (B, Tq, H*hd) contiguous; q, k, v, key_valid, s as the forward
 *  lse  (B, Tq, H) from attention_forward_lse, or NULL to recompute it here
 *       (then B*Tq*H floats are allocated for the call)
 * Rows with no visible key have a zero output and get a zero gradient.
 * Work is split over (batch row, kv head) pairs. Returns 0, or -1 when the
 * lse buffer cannot be allocated (nothing written). */
int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                       const float *v, const float *out, const float *lse, const uint8_t *key_valid,
                       const attention_shape *s, int n_threads);

/* Softmax cross-entropy, forward and backward in one pass over the logits.
 *  losses (N): -log softmax(logits)[target], 0 for ignored rows
 *  dlogits (N, V) += dloss_scale * (softmax - onehot(target)), or NULL;
 *       ignored rows get nothing
 *  logits (N, V); targets (N) in [0, V) or CEPE_IGNORE_INDEX
 * dloss_scale is e.g. lm_loss_cof / (number of non-ignored rows).
 * Returns 0, or -1 (nothing written) if a target is out of range. */
int cross_entropy_forward_backward(float *losses, float *dlogits, const float *logits, const int32_t *targets,
                                   int N, int V, float dloss_scale);

/* CEPED distillation: forward KL(teacher ‖ student) over a top-K table,
 * spec CEPE.md §6.4 (LlamaForCausalContextLM.forward of the reference).
 *  losses (N): the per-row KL (the reference's "batchmean" is the mean of
 *       these over all rows: pass dloss_scale = kl_loss_cof / N)
 *  dlogits (N, V) += dloss_scale * d losses[i] / d logits, or NULL
 *  logits (N, V): student logits; q = softmax(logits) gathered at the K
 *       teacher ids, plus the student remainder 1 - Σ q
 *  teacher_probs_fp16 (N, K+1): IEEE half bits, K top probabilities and the
 *       teacher's remainder bucket; teacher_index (N, K) in [0, V)
 *  mode CEPE_KL_SMOOTH (with delta >= 0) or CEPE_KL_DROP (delta unused)
 * Returns 0, or -1 (nothing written) for a bad mode, K < 1 or an index out
 * of range. */
int kl_topk_forward_backward(float *losses, float *dlogits, const float *logits,
                             const uint16_t *teacher_probs_fp16, const int32_t *teacher_index, int N, int V,
                             int K, int mode, float delta, float dloss_scale);

#endif /* CEPE_OPS_H */
