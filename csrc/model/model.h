/* model.h — the decoder's plain structs (llama2.c style): config, weights as
 * named views into caller-owned buffers, and the per-request run state. */
#ifndef CEPE_MODEL_H
#define CEPE_MODEL_H

#include <stdatomic.h>
#include <stdint.h>

#include "../backend.h"
#include "../cepe.h"
#include "../quant/quant.h"
#include "../rope/rope.h"

#define CEPE_MAX_HEAD_DIM 256 /* attention keeps a head's accumulator on the stack */

/* Weight matrices are cepe_qtensors in the format they were bound in (F32,
 * F16, BF16 or a GGUF block format on the CPU; F32, or BF16 for a bf16
 * model, on a device); norms are always fp32. */
typedef struct {
    const float *attn_norm; /* (d) input_layernorm */
    cepe_qtensor wq;        /* (H*hd, d) */
    cepe_qtensor wk;        /* (KVH*hd, d) */
    cepe_qtensor wv;        /* (KVH*hd, d) */
    cepe_qtensor wo;        /* (d, H*hd) */
    const float *ffn_norm;  /* (d) post_attention_layernorm */
    cepe_qtensor w_gate;    /* (ff, d) */
    cepe_qtensor w_up;      /* (ff, d) */
    cepe_qtensor w_down;    /* (d, ff) */
    /* CEPE cross-attention (data NULL in layers without it) */
    const float *cross_norm; /* (d) cross_attn.layernorm */
    cepe_qtensor cross_wq;   /* (H*hd, d) */
    cepe_qtensor cross_wk;   /* (KVH*hd, d_enc) */
    cepe_qtensor cross_wv;   /* (KVH*hd, d_enc) */
    cepe_qtensor cross_wo;   /* (d, H*hd) */
} layer_weights;

typedef struct {
    cepe_qtensor embed;      /* (V, d): rows gathered (model_embedding) */
    const float *final_norm; /* (d) */
    cepe_qtensor lm_head;    /* (V, d), == embed when tied */
    layer_weights *layers;   /* (n_layers) */
} decoder_weights;

/* The CEPE encoder: a LLaMA stack without lm_head, bidirectional. */
typedef struct {
    cepe_qtensor embed;      /* (V_enc, d_enc) */
    const float *final_norm; /* (d_enc) */
    layer_weights *layers;   /* (n_layers_enc); cross_* unused */
} encoder_weights;

/* One expected tensor: its HF name, its shape and where the pointer goes. */
typedef struct {
    char name[96];
    int ndim;
    int64_t shape[2];
    const float **dst; /* a 1-D tensor (norm): its pointer */
    cepe_qtensor *q;   /* a matrix: its tensor (dst NULL) */
    void *owned;       /* device backends: the device copy bind made (freed with the model) */
} weight_slot;

struct cepe_model {
    cepe_config cfg;
    int n_threads;
    const cepe_backend *be;
    int bf16; /* device: linear weights stored as bf16 (cepe_model_set_bf16); embeddings and norms stay fp32
               */
    size_t qwork_size; /* scratch bytes model_matmul needs at most for any rows (set at finalize) */
    decoder_weights w;
    weight_slot *slots; /* one per parameter (model.c's tables), cap_slots allocated */
    int n_slots, cap_slots;
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
    /* [dev] KV cache: (cache_layers, B, cap, KVH*hd) each; RoPE already applied to K. */
    float *k_cache, *v_cache;
    int cache_layers;         /* n_layers; 1: single-pass (cepe_ctx_create_single_pass), one layer's K/V */
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
     * owned device copy on a device, or owned where cepe_ctx_encode_context
     * encoded them (ctx_states_own); mask owned */
    int ctx_N;
    const float *ctx_states;
    float *ctx_states_own;    /* [dev] */
    uint8_t *ctx_mask;        /* [dev] (B, ctx_N) */
    int cross_kept;           /* 1: cross_k/v hold every cross layer's K/V */
    float *cross_k, *cross_v; /* [dev] kept: (n_cross, B, N, kvd); else (B, N, kvd) scratch */
    int32_t *step_ids;        /* [host] (B) the tokens generate just picked */
    void *qwork; /* [host] m->qwork_size bytes: model_matmul's scratch for stored-format weights */
};

/* cepe_ctx_forward without clearing a pending interrupt (the generation loop). */
cepe_status cepe_ctx_forward_continue(cepe_ctx *x, const int32_t *ids, const double *positions,
                                      const uint8_t *mask, int T, float *logits, cepe_logits_mode mode);

/* ctx.c: back to an empty cache and the short RoPE table; nonzero when the
 * table's upload failed. */
int cepe_ctx_reset_checked(cepe_ctx *x);

/* encoder.c: cepe_model_encode with ids / mask on the host and out in the
 * backend's memory when out_on_backend (the training forward's states, a
 * context encoded where the decoder reads it). progress: NULL, or the
 * request whose progress counts chunk batches and whose interrupt stops it. */
cepe_status model_encode_into(const cepe_model *m, const int32_t *ids, const uint8_t *mask, int n_chunks,
                              int L, float *out, int out_on_backend, cepe_ctx *progress);

/* CEPE_OK, or the backend's first failure since the last check (it waits for
 * queued device work): every public call that ran ops ends with it. */
cepe_status backend_check(const cepe_backend *be);
/* The backend's error, or a generic one when it reported none (after an op failed). */
cepe_status backend_fail(const cepe_backend *be);

/* What a block's forward records for its backward (training passes one per
 * layer; inference none). The normed inputs (xn) and silu(gate)*up are
 * recomputed in the backward (one cheap elementwise pass each), not kept. */
typedef struct {
    float *x_in;      /* (N, d) the block's input (residual stream) */
    float *q, *k, *v; /* (N, qd), (N, kvd) x2: after RoPE */
    float *att, *lse; /* (N, qd) attention output, (N, H) its log-sum-exp */
    float *x_post;    /* (N, d) input of post_attention_layernorm */
    float *gate, *up; /* (N, ff) pre-activation */
    /* CEPE cross-attention (decoder layers that have it) */
    float *x_mid;            /* (N, d) input of cross_attn.layernorm */
    float *qc, *attc, *lsec; /* (N, qd), (N, qd), (N, H) */
    float *kc, *vc;          /* (B*Nc, kvd) projections of the encoder states */
} block_record;

/* Scratch views one block needs for N rows (block.c). */
typedef struct {
    float *xn, *q, *k, *v, *att, *gate, *up;
    const float *cos_t, *sin_t;
    void *qwork;             /* model_matmul's scratch (m->qwork_size bytes), or NULL */
    float *h;                /* (N, ff) silu(gate)*up when gate must survive (recording); NULL: in place */
    const block_record *rec; /* NULL, or where the forward records for the backward */
} block_scratch;

/* s with its q, k, v, att, gate and up in r, recording into r (h: the
 * SwiGLU output's scratch). */
static inline block_scratch block_scratch_recording(const block_scratch *s, const block_record *r, float *h) {
    block_scratch o = *s;
    o.q = r->q, o.k = r->k, o.v = r->v, o.att = r->att, o.gate = r->gate, o.up = r->up;
    o.h = h, o.rec = r;
    return o;
}

/* Keys / values a block's queries attend to, their validity and the shape. */
typedef struct {
    const float *k, *v;
    const uint8_t *valid;
    attention_shape shape;
} block_kv_src;

/* The attention shape of B sequences of Tq queries over Tk keys, rows packed
 * (Tq | Tk per sequence) with c's head layout; causal ones take c's sliding
 * window. */
attention_shape block_shape(const cepe_config *c, int B, int Tq, int Tk, int causal);

/* The RoPE position of token i and its row's next: given (E2-LLM), or the
 * count of real tokens before it in its row (HF's cumsum(mask) - 1). */
static inline double model_position(const double *given, long i, int real, double *next) {
    const double p = given ? given[i] : *next;
    if (real) *next = p + 1.0;
    return p;
}

/* The data of slot s (its tensor's, for a matrix). */
static inline const void *slot_data(const weight_slot *s) {
    return s->q ? s->q->data : (const void *)*s->dst;
}

/* out (N, w->n_out) (+)= inp (N, w->n_in) · wᵀ, whatever w's format: fp32
 * through the backend's matmul, bf16 on a device through its matmul_bf16,
 * the stored formats on the CPU through cepe_qmatmul with qwork
 * (m->qwork_size bytes, or NULL: it allocates). Nonzero on failure. */
int model_matmul(const cepe_model *m, void *qwork, float *out, const float *inp, const cepe_qtensor *w, int N,
                 int accumulate);
/* The backward of model_matmul: dinp (N, n_in) (+)= dout · w and, for an
 * fp32 w, dweight += doutᵀ · inp (NULL: frozen). A stored-format w is frozen:
 * its input gradient goes through widened tiles (cepe_qmatmul_backward_input). */
int model_matmul_backward(const cepe_model *m, float *dinp, float *dweight, const float *dout,
                          const float *inp, const cepe_qtensor *w, int N, int accumulate);
/* out (N, d) = rows ids of the embedding table e (F32 through the backend's
 * embedding op, other formats widened row by row on the CPU). */
int model_embedding(const cepe_model *m, float *out, const int32_t *ids, const cepe_qtensor *e, int N);
/* Scratch bytes model_matmul needs for any number of rows of any of m's weights. */
size_t model_qwork_size(const cepe_model *m);

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
/* kc, vc (rows, kvd) = CEPE cross-attention K/V of the encoder states E
 * (rows, d_enc): no RoPE (spec §3). */
void block_cross_kv(const cepe_model *m, const layer_weights *w, void *qwork, float *kc, float *vc,
                    const float *E, int rows);
/* The rest of a block once its K/V are where self_kv says (xn = RMSNorm(x)
 * already): q, self-attention, o_proj; CEPE cross-attention over cross when
 * non-NULL (between self-attention and the MLP, spec §3); the MLP. */
void block_attend(const cepe_model *m, const layer_weights *w, const cepe_config *c, float *x,
                  const block_scratch *s, int N, const rope_state *rope, const block_kv_src *self_kv,
                  const block_kv_src *cross, int nt);
/* One whole block over N rows attending among themselves (the encoder, the
 * training decoder): block_kv, then block_attend over s->k / s->v with
 * valid and shape. */
void block_layer(const cepe_model *m, const layer_weights *w, const cepe_config *c, float *x,
                 const block_scratch *s, int N, const rope_state *rope, const uint8_t *valid,
                 const attention_shape *shape, const block_kv_src *cross, int nt);

/* encoder.c: the RoPE tables of rows tokens in chunks of L (positions: slot
 * index in the chunk); pos_h is host scratch, pos / inv_freq backend scratch. */
cepe_status encoder_rope_table(const cepe_model *m, int rows, int L, double *pos_h, double *pos,
                               float *inv_freq, float *cos_t, float *sin_t);
/* encoder.c: the encoder layers over nb chunks of L embedded tokens in x
 * (then x holds the stream before the final norm); rec: NULL, or one record
 * per layer (s->h then its SwiGLU scratch). */
void encoder_layers(const cepe_model *m, float *x, const uint8_t *mask, int nb, int L, const block_scratch *s,
                    block_record *rec);

#endif /* CEPE_MODEL_H */
