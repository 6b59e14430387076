/* model.h — the decoder's plain structs (llama2.c style): config, weights as
 * named views into caller-owned buffers, and the per-request run state. */
#ifndef CEPE_MODEL_H
#define CEPE_MODEL_H

#include <stdatomic.h>
#include <stdint.h>

#include "../backend.h"
#include "../cepe.h"

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
} layer_weights;

typedef struct {
    const float *embed;      /* (V, d) */
    const float *final_norm; /* (d) */
    const float *lm_head;    /* (V, d), == embed when tied */
    layer_weights *layers;   /* (n_layers) */
} decoder_weights;

/* One expected tensor: its HF name, its shape and where the pointer goes. */
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];
    const float **dst;
} weight_slot;

struct cepe_model {
    cepe_config cfg;
    int n_threads;
    const cepe_backend *be;
    decoder_weights w;
    weight_slot *slots;
    int n_slots;
    int finalized;
    float *inv_freq; /* (rope_half) per-pair RoPE frequencies */
    int rope_half;   /* rotary pairs per head */
};

struct cepe_ctx {
    const cepe_model *m;
    int B, cap, len, chunk;
    atomic_int interrupt;
    /* KV cache: (n_layers, B, cap, KVH*hd) each; RoPE already applied to K. */
    float *k_cache, *v_cache;
    uint8_t *valid;   /* (B, cap) 1 = real token */
    double *next_pos; /* (B) position of the next real token per row */
    /* run state for one chunk of B*chunk rows */
    int32_t *ids;
    double *pos;
    float *cos_t, *sin_t;  /* (rows, rope_half) */
    float *x, *xn;         /* (rows, d) residual stream, normed copy */
    float *q, *k, *v, *att; /* (rows, H*hd | KVH*hd) */
    float *gate, *up;      /* (rows, ff) */
    float *last_hidden;    /* (B, d) */
    float *last_logits;    /* (B, V) */
    int has_logits;
    /* sampler scratch */
    float *probs;          /* (V) */
    int32_t *cand;         /* (V) */
    uint8_t *finished;     /* (B) */
    int32_t *step_ids;     /* (B) */
};

/* rope_freq.c: fills inv_freq (half) for the config; returns half via *half. */
cepe_status cepe_rope_init(const cepe_config *cfg, float **inv_freq, int *half);

#endif /* CEPE_MODEL_H */
