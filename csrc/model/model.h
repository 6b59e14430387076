/* model.h — the decoder's plain structs (llama2.c style): config, weights as
 * named views into caller-owned buffers, and the per-request run state. */
#ifndef CEPE_MODEL_H
#define CEPE_MODEL_H

#include <stdatomic.h>
#include <stdint.h>

#include "../backend.h"
#include "../cepe.h"
#include "../rope.h"

#define CEPE_MAX_HEAD_DIM 256 /* attention keeps a head's accumulator on the stack */

typedef struct {
    const float *attn_norm; /* (d) input_layernorm */
    const float *wq;        /* (H*hd, d) */
    const float *wk;        /* (KVH*hd, d) */
    const float *wv;        /* (KVH*hd, d) */
    const float *wo;        /* (d, H*hd) */
    const float *ffn_norm;  /* (d) post_attention_layernorm */
    const float *w_gate;    /* (ff, d) */
    const float *w_up;      /* (ff, d) */
    const float *w_down;    /* (d, ff) */
    /* CEPE cross-attention (NULL in layers without it) */
    const float *cross_norm; /* (d) cross_attn.layernorm */
    const float *cross_wq;   /* (H*hd, d) */
    const float *cross_wk;   /* (KVH*hd, d_enc) */
    const float *cross_wv;   /* (KVH*hd, d_enc) */
    const float *cross_wo;   /* (d, H*hd) */
} layer_weights;

typedef struct {
    const float *embed;      /* (V, d) */
    const float *final_norm; /* (d) */
    const float *lm_head;    /* (V, d), == embed when tied */
    layer_weights *layers;   /* (n_layers) */
} decoder_weights;

/* The CEPE encoder: a LLaMA stack without lm_head, bidirectional. */
typedef struct {
    const float *embed;      /* (V_enc, d_enc) */
    const float *final_norm; /* (d_enc) */
    layer_weights *layers;   /* (n_layers_enc); cross_* unused */
} encoder_weights;

/* One expected tensor: its HF name, its shape and where the pointer goes. */
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];
    const float **dst;
    float *owned; /* device backends: the device copy bind made (freed with the model) */
} weight_slot;

struct cepe_model {
    cepe_config cfg;
    int n_threads;
    const cepe_backend *be;
    int bf16; /* linear weights stored as bf16 (cepe_model_set_bf16); embeddings and norms stay fp32 */
    decoder_weights w;
    weight_slot *slots;
    int n_slots;
    int finalized;
    rope_state rope;
    int first_cross; /* first layer with cross-attention (n_layers if none) */
    /* CEPE encoder (has_encoder = 0: a plain decoder) */
    int has_encoder;
    cepe_config enc_cfg;
    encoder_weights enc;
    rope_state enc_rope;
};

/* Per-request state. Buffers marked [dev] live in the backend's memory
 * (device memory on a GPU: only ops, upload and download touch them); [host]
 * ones are plain memory the C code reads and writes; [both] have a host
 * mirror (suffix _h) filled on the host and uploaded before use. */
struct cepe_ctx {
    const cepe_model *m;
    int B, cap, len, chunk;
    atomic_int interrupt;
    atomic_long progress_done,
        progress_total; /* layer passes of the running forward call (any thread may read) */
    /* [dev] KV cache: (n_layers, B, cap, KVH*hd) each; RoPE already applied to K. */
    float *k_cache, *v_cache;
    uint8_t *valid, *valid_h; /* [both] (B, cap) 1 = real token */
    double *next_pos;         /* [host] (B) position of the next real token per row */
    /* run state for one chunk of B*chunk rows */
    float *inv_freq, *inv_freq_h; /* [both] (rope.half) this call's RoPE table (dynamic NTK / LongRoPE) */
    float rope_mscale;
    int rope_cached_len;    /* dynamic NTK: longest sequence seen by this request */
    int rope_len_hint;      /* cepe_ctx_set_rope_length */
    double *saved_pos;      /* [host] (B) next_pos at the start of a call, restored if it is stopped */
    int32_t *ids, *ids_h;   /* [both] (rows) */
    double *pos, *pos_h;    /* [both] (rows) */
    float *cos_t, *sin_t;   /* [dev] (rows, rope_half) */
    float *x, *xn;          /* [dev] (rows, d) residual stream, normed copy */
    float *q, *k, *v, *att; /* [dev] (rows, H*hd | KVH*hd) */
    float *gate, *up;       /* [dev] (rows, ff) */
    float *last_hidden;     /* [dev] (B, d) */
    float *last_logits, *last_logits_h; /* [both] (B, V); the device copy is downloaded */
    float *logits_d; /* [dev] (rows, V), device backends asked for every position's logits; lazy */
    float *nll_logits, *nll_loss; /* [dev] (NLL_ROWS, V), (NLL_ROWS): cepe_ctx_forward_nll's scratch; lazy */
    int32_t *nll_targets;         /* [dev] (NLL_ROWS) */
    float *nll_x;                 /* [dev] (NLL_ROWS, d) the scored rows' final states */
    int32_t *nll_targets_h;       /* [host] (NLL_ROWS) */
    long *nll_rows_h;             /* [host] (NLL_ROWS) where each scored row goes in the caller's (B, T) */
    float *nll_loss_h;            /* [host] (NLL_ROWS) */
    int has_logits;
    /* CEPE context: encoder states (B, ctx_N, d_enc): borrowed on the CPU, an
     * owned device copy on a device (ctx_states_own); mask owned */
    int ctx_N;
    const float *ctx_states;
    float *ctx_states_own;    /* [dev] */
    uint8_t *ctx_mask;        /* [dev] (B, ctx_N) */
    int cross_kept;           /* 1: cross_k/v hold every cross layer's K/V */
    float *cross_k, *cross_v; /* [dev] kept: (n_cross, B, N, kvd); else (B, N, kvd) scratch */
    int32_t *step_ids; /* [host] (B) the tokens generate just picked */
};

/* cepe_ctx_forward without clearing a pending interrupt (the generation loop). */
cepe_status cepe_ctx_forward_continue(cepe_ctx *x, const int32_t *ids, const double *positions,
                                      const uint8_t *mask, int T, float *logits, cepe_logits_mode mode);

/* ctx.c: back to an empty cache and the short RoPE table; nonzero when the
 * table's upload failed. */
int cepe_ctx_reset_checked(cepe_ctx *x);

/* encoder.c: cepe_model_encode with ids / mask on the host and out in the
 * backend's memory when out_on_backend (the training forward's states). */
cepe_status model_encode_into(const cepe_model *m, const int32_t *ids, const uint8_t *mask, int n_chunks,
                              int L, float *out, int out_on_backend);

/* CEPE_OK, or the backend's first failure since the last check (it waits for
 * queued device work): every public call that ran ops ends with it. */
cepe_status backend_check(const cepe_backend *be);
/* The backend's error, or a generic one when it reported none (after an op failed). */
cepe_status backend_fail(const cepe_backend *be);

/* Scratch views one block needs for N rows (block.c). */
typedef struct {
    float *xn, *q, *k, *v, *att, *gate, *up;
    const float *cos_t, *sin_t;
} block_scratch;

/* out (N, OC) (+)= inp (N, C) · w (OC, C)ᵀ in the model's weight format:
 * bf16 weights through matmul_bf16 (the embedding table, which a tied
 * lm_head shares, always stays fp32). */
static inline int model_matmul(const cepe_model *m, float *out, const float *inp, const float *w, int N,
                               int C, int OC, int accumulate) {
    const cepe_backend *be = m->be;
    if (m->bf16 && w != m->w.embed)
        return be->matmul_bf16(be, out, inp, (const uint16_t *)(const void *)w, N, C, OC, accumulate,
                               m->n_threads);
    return be->matmul(be, out, inp, w, N, C, OC, accumulate, m->n_threads);
}

/* xn = RMSNorm(x); k, v = projections; RoPE on k. */
void block_kv(const cepe_model *m, const layer_weights *w, const cepe_config *c, const float *x,
              const block_scratch *s, int N, const rope_state *rope, int nt);
/* q = projection of xn; RoPE on q. */
void block_q(const cepe_model *m, const layer_weights *w, const cepe_config *c, const block_scratch *s, int N,
             const rope_state *rope, int nt);
/* Both: xn = RMSNorm(x); q, k, v = projections; RoPE on q and k. */
void block_qkv(const cepe_model *m, const layer_weights *w, const cepe_config *c, const float *x,
               const block_scratch *s, int N, const rope_state *rope, int nt);
/* x += MLP(RMSNorm(x)). */
void block_mlp(const cepe_model *m, const layer_weights *w, const cepe_config *c, float *x,
               const block_scratch *s, int N, int nt);

#endif /* CEPE_MODEL_H */
