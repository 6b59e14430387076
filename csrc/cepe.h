/* cepe.h — the one public C API of the cepe core.
 *
 * Conventions
 *  - Every function that can fail returns a cepe_status; on failure
 *    cepe_last_error() holds a message for the calling thread.
 *  - Handles are opaque. A cepe_model holds borrowed pointers to weights
 *    (the caller keeps them alive and unchanged until cepe_model_free) and is
 *    immutable once cepe_model_finalize succeeds, so any number of threads
 *    may run contexts of one model at once.
 *  - A cepe_ctx is per-request state (KV cache, scratch); one thread at a
 *    time. It allocates everything when created: nothing is allocated in the
 *    per-token loop.
 *  - Linear weights are float32, row-major [out, in] (PyTorch layout).
 */
#ifndef CEPE_H
#define CEPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CEPE_OK = 0,
    CEPE_ERR_INVALID_ARG = 1,  /* a bad value or shape from the caller */
    CEPE_ERR_OUT_OF_MEMORY = 2,
    CEPE_ERR_MISSING_WEIGHT = 3,
    CEPE_ERR_UNSUPPORTED = 4,  /* valid request this build cannot serve */
    CEPE_ERR_STATE = 5,        /* call order / capacity problems */
    CEPE_ERR_INTERRUPTED = 6,  /* cepe_ctx_interrupt() was called */
    CEPE_ERR_BACKEND = 7       /* BLAS / CUDA failure */
} cepe_status;

/* Decoder hyper-parameters (the subset of an HF LlamaConfig the math needs). */
typedef struct {
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int tie_word_embeddings; /* lm_head shares embed_tokens */
    int sliding_window;      /* 0 = full causal attention (Mistral sets it) */
    float rms_norm_eps;
    double rope_theta;
} cepe_config;

typedef struct cepe_model cepe_model;
typedef struct cepe_ctx cepe_ctx;

/* ---- errors ------------------------------------------------------------ */
const char *cepe_last_error(void);
const char *cepe_status_name(cepe_status s);

/* ---- build info -------------------------------------------------------- */
/* Human-readable BLAS name/config, and the OpenMP thread limit. */
const char *cepe_blas_info(void);
int cepe_max_threads(void);
/* Sets the BLAS thread count (process-wide: BLAS libraries keep one pool). */
void cepe_set_blas_threads(int n);

/* ---- model ------------------------------------------------------------- */
cepe_status cepe_model_create(const cepe_config *cfg, int n_threads, cepe_model **out);
void cepe_model_free(cepe_model *m);
/* Binds one weight by its HF name ("model.layers.3.self_attn.q_proj.weight").
 * The shape must be the one the config implies; data must stay valid. */
cepe_status cepe_model_bind(cepe_model *m, const char *name, const float *data, int ndim,
                            const int64_t *shape);
/* Checks every required weight is bound; after this the model is usable. */
cepe_status cepe_model_finalize(cepe_model *m);
const cepe_config *cepe_model_config(const cepe_model *m);

/* ---- per-request context: KV cache + run state --------------------------- */
/* batch rows of up to `capacity` tokens each (prompt + generated). */
cepe_status cepe_ctx_create(const cepe_model *m, int batch, int capacity, cepe_ctx **out);
void cepe_ctx_free(cepe_ctx *c);
void cepe_ctx_reset(cepe_ctx *c);
int cepe_ctx_length(const cepe_ctx *c);   /* tokens per row already cached */
int cepe_ctx_capacity(const cepe_ctx *c);
int cepe_ctx_batch(const cepe_ctx *c);
/* Asks a running forward/generate on this ctx to stop soon (any thread). */
void cepe_ctx_interrupt(cepe_ctx *c);

typedef enum {
    CEPE_LOGITS_NONE = 0, /* keep only the last position's logits inside ctx */
    CEPE_LOGITS_LAST = 1, /* write (batch, vocab) */
    CEPE_LOGITS_ALL = 2   /* write (batch, T, vocab) */
} cepe_logits_mode;

/* Appends T tokens to every row and runs the decoder over them.
 *  ids:       (batch, T) token ids
 *  positions: (batch, T) RoPE positions, or NULL for "count of real tokens
 *             before this one in the row" (HF's cumsum(mask) - 1)
 *  mask:      (batch, T) 1 = real token, 0 = padding (never attended), or NULL
 *  logits:    see cepe_logits_mode; may be NULL with CEPE_LOGITS_NONE */
cepe_status cepe_ctx_forward(cepe_ctx *c, const int32_t *ids, const double *positions,
                             const uint8_t *mask, int T, float *logits, cepe_logits_mode mode);

typedef struct {
    float temperature; /* 0 = greedy */
    int top_k;         /* 0 = off */
    float top_p;       /* 1 = off */
    uint64_t seed;
    const int32_t *eos_ids; /* a row stops after emitting any of these */
    int n_eos;
    int pad_token_id;       /* written after a row finished */
} cepe_sampling;

/* Samples up to max_new tokens per row, starting from the logits the last
 * forward left in the context. out: (batch, max_new). *n_out receives the
 * number of steps taken (all rows stop early once each produced eos). */
cepe_status cepe_ctx_generate(cepe_ctx *c, const cepe_sampling *s, int max_new, int32_t *out,
                              int *n_out);

#ifdef __cplusplus
}
#endif
#endif /* CEPE_H */
