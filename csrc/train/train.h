/* train.h — internals of the training code (csrc/train/): the optimizer
 * pieces over flat fp32 buffers (adamw.c, schedule.c) and the training state
 * of a CEPE model (state.c: layout, buffers, update; forward.c: the training
 * forward that keeps what the backward needs; backward.c: losses and the
 * backward pass). The public face is the "training" section of cepe.h. */
#ifndef CEPE_TRAIN_H
#define CEPE_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "../cepe.h"
#include "../model/model.h"

/* Offsets of tensors in the flat buffers are multiples of this many floats
 * (64 bytes: every tensor starts on a cache line). */
#define CEPE_PARAM_ALIGN 16

/* Logits are formed for at most this many floats at a time (rows x vocab)
 * unless cepe_train_config.logit_floats says otherwise: the loss and its
 * gradient go through them chunk by chunk, so a 32K or 128K vocabulary
 * never needs a (B*T, V) buffer. */
#define CEPE_LOGIT_FLOATS ((long)1 << 21)

/* Positions per logits chunk (within one row of T tokens). */
static inline int train_logit_rows(long logit_floats, int T, int V) {
    const long r = (logit_floats > 0 ? logit_floats : CEPE_LOGIT_FLOATS) / V;
    return r < 1 ? 1 : (r > T ? T : (int)r);
}

/* One trainable tensor: its weight slot in the model and its place in the
 * flat params / grads / moment buffers. */
typedef struct {
    int slot;      /* index into cepe_model.slots */
    size_t offset; /* in floats */
    size_t n;      /* element count */
    int decay;     /* weight decay applies (2-D weights; not norm weights, as HF Trainer) */
} train_tensor;

/* Gradient scratch of a stack (decoder or encoder), sized for its rows. */
typedef struct {
    float *dx, *dxn, *xn;        /* (N, d) */
    float *dq, *datt;            /* (N, qd) */
    float *dk, *dv;              /* (N, kvd) */
    float *h, *dh, *dgate, *dup; /* (N, ff) */
} stack_scratch;

struct cepe_train {
    const cepe_model *m;
    cepe_train_config cfg;
    int n_threads;
    /* flat buffers: params, moments borrowed from the caller; grads owned */
    float *params, *adam_m, *adam_v, *grads;
    size_t n_params;
    train_tensor *tensors;
    int n_tensors;
    long step; /* optimizer steps taken */
    /* Gradient views: a model whose weight pointers are the gradients of the
     * trainable tensors (NULL = frozen: no gradient is formed for it). It
     * reuses cepe_model's names and shapes, so a gradient lands in the same
     * field as the weight it belongs to. */
    cepe_model *gm;
    void *qwork;       /* m->qwork_size bytes: model_matmul's scratch for frozen stored-format weights */
    int train_decoder; /* any decoder tensor besides cross-attention trains */
    int train_encoder; /* gradients flow into the encoder (else its output is detached) */
    int dec_lo;        /* lowest decoder layer the backward must visit */
    /* activations + scratch, one allocation sized for (B, T, n_ctx, L) */
    void *arena;
    int B, T, n_ctx, L, T_kl; /* the shape the arena was carved for */
    block_record *dec, *enc;  /* per layer */
    stack_scratch ds, es;
    float *x, *x_final, *xnf, *dxnf;        /* decoder (N, d) */
    float *logits, *dlogits, *losses;       /* (R, V), (R, V), (N) */
    float *cos_t, *sin_t, *ecos_t, *esin_t; /* RoPE tables (N | Ne, half) */
    double *pos, *epos;
    int32_t *targets;  /* (N) shifted labels */
    uint8_t *ctx_mask; /* (B, Nc) 1 = real context token */
    float *ex, *ex_final, *E,
        *dE;                     /* encoder (Ne, d_enc): stream, before final norm, states, their gradient */
    float *dkc, *dvc;            /* (B*Nc, kvd) */
    float *kl_losses;            /* (N) */
    float *inv_freq, *einv_freq; /* (half) this batch's RoPE frequencies, decoder / encoder */
    /* What host code computes (positions, shifted labels, the context mask)
     * or reads back (losses): host mirrors of the arena buffers above, in
     * their own allocation; uploaded / downloaded around the ops. */
    void *host_arena;
    double *pos_h, *epos_h;
    int32_t *targets_h;
    uint8_t *ctx_mask_h;
    float *losses_h, *kl_losses_h;
    /* The micro-batch as the ops see it: the caller's arrays on the CPU,
     * device copies (db_bufs, freed after the call) on a device. */
    cepe_train_batch db;
    void *db_bufs[6];
    /* AdamW moments and the norm's partial sums in backend memory (the
     * caller's adam_m / adam_v on the CPU; copies on a device, written back
     * by cepe_train_sync_host). Params on a device are the model's own
     * device copies of the trainable weights. */
    float *dm, *dv;
    double *norm_partial;
};

/* forward.c: runs the encoder and the decoder over the batch, keeping in
 * t->enc / t->dec what the backward needs (layers >= dec_lo; the encoder's
 * only when it trains), and leaves the final normed states in t->xnf. */
cepe_status train_forward(cepe_train *t, const cepe_train_batch *b);
/* step.c: the backend's first failure as a status (CEPE_OK if none). */
cepe_status train_check(const cepe_train *t);

/* backward.c: the losses from t->xnf, then gradients (scaled by grad_scale)
 * accumulated into t->grads through every trainable tensor. */
cepe_status train_backward(cepe_train *t, const cepe_train_batch *b, double grad_scale,
                           cepe_train_stats *out);

/* adamw.c: AdamW's per-step scalars (host, double -> float as torch casts
 * them), which drive the backend's adamw op (ops/optim.h). */
void cepe_adamw_scalars(double lr, const cepe_adamw_config *h, double weight_decay, long t,
                        cepe_adamw_scalars_t *o);

#endif /* CEPE_TRAIN_H */
