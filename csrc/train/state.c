/* state.c — the training state of a CEPE model (llm.c's GPT2 struct, for
 * training): which weights train and where each sits in the flat buffers,
 * the gradient views, the activation arena, zero_grad and the update. */
#include <math.h>
#include <string.h>

#include "../common.h"
#include "train.h"

/* ------------------------------------------------------------------ layout */

/* Spec §6.1 (train.py's train_param): a tensor trains when its name contains
 * "cross_attn", or starts with "encoder." under --train_encoder, or always
 * under --train_everything. */
static int is_trainable(const char *name, cepe_trainable which) {
    if (which == CEPE_TRAIN_ALL) return 1;
    if (strstr(name, "cross_attn")) return 1;
    return which == CEPE_TRAIN_CROSS_ATTN_ENCODER && strncmp(name, "encoder.", 8) == 0;
}

static size_t slot_numel(const weight_slot *s) {
    return (size_t)s->shape[0] * (s->ndim == 2 ? (size_t)s->shape[1] : 1);
}

/* An encoder embedding bound to the decoder's own table (a head that shares it) is the
 * decoder's tensor: it trains, or stays frozen, as the decoder's embed_tokens does, and has no
 * second copy in the flat buffers. */
static int is_shared_embedding(const cepe_model *m, const weight_slot *s) {
    return m->has_encoder && s->q == &m->enc.embed && m->enc.embed.data == m->w.embed.data;
}

/* Fills tensors (may be NULL: count only); returns the tensor count. */
static int build_layout(const cepe_model *m, cepe_trainable which, train_tensor *tensors, size_t *n_params) {
    int n = 0;
    size_t off = 0;
    for (int i = 0; i < m->n_slots; i++) {
        const weight_slot *s = &m->slots[i];
        if (!is_trainable(s->name, which) || is_shared_embedding(m, s)) continue;
        if (tensors)
            tensors[n] = (train_tensor){.slot = i, .offset = off, .n = slot_numel(s), .decay = s->ndim == 2};
        off += (slot_numel(s) + CEPE_PARAM_ALIGN - 1) / CEPE_PARAM_ALIGN * CEPE_PARAM_ALIGN;
        n++;
    }
    *n_params = off;
    return n;
}

static cepe_status check_which(const cepe_model *m, cepe_trainable which) {
    if (which != CEPE_TRAIN_CROSS_ATTN && which != CEPE_TRAIN_CROSS_ATTN_ENCODER && which != CEPE_TRAIN_ALL)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "trainable must be cross_attn, cross_attn+encoder or all, got %d", (int)which);
    if (which != CEPE_TRAIN_ALL && m->cfg.n_cross_layers == 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "this model has no cross-attention layers to train (not a CEPE model)");
    if (which == CEPE_TRAIN_CROSS_ATTN_ENCODER && !m->has_encoder)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "trainable=cross_attn+encoder, but this model has no CEPE encoder");
    return CEPE_OK;
}

cepe_status cepe_train_layout(const cepe_model *m, cepe_trainable which, int *n_tensors, size_t *n_params) {
    if (!m || !n_tensors || !n_params)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_layout: NULL argument");
    cepe_status st = check_which(m, which);
    if (st) return st;
    *n_tensors = build_layout(m, which, NULL, n_params);
    return CEPE_OK;
}

cepe_status cepe_train_tensor(const cepe_model *m, cepe_trainable which, int i, const char **name, int *ndim,
                              int64_t shape[2], size_t *offset) {
    if (!m || !name || !ndim || !shape || !offset)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_tensor: NULL argument");
    cepe_status st = check_which(m, which);
    if (st) return st;
    size_t n_params;
    const int n = build_layout(m, which, NULL, &n_params);
    if (i < 0 || i >= n) return cepe_fail(CEPE_ERR_INVALID_ARG, "tensor index %d is outside [0, %d)", i, n);
    train_tensor *ts = cepe_calloc((size_t)n, sizeof *ts);
    if (!ts) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory");
    build_layout(m, which, ts, &n_params);
    const weight_slot *s = &m->slots[ts[i].slot];
    *name = s->name;
    *ndim = s->ndim;
    shape[0] = s->shape[0];
    shape[1] = s->ndim == 2 ? s->shape[1] : 0;
    *offset = ts[i].offset;
    cepe_free(ts);
    return CEPE_OK;
}

cepe_status cepe_model_weight_at(const cepe_model *m, int i, const char **name, const float **data, int *ndim,
                                 int64_t shape[2]) {
    if (!m || !name || !data || !ndim || !shape)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_weight_at: NULL argument");
    if (i < 0 || i >= m->n_slots)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "weight index %d is outside [0, %d)", i, m->n_slots);
    const weight_slot *s = &m->slots[i];
    *name = s->name;
    *data = slot_data(s);
    *ndim = s->ndim;
    shape[0] = s->shape[0];
    shape[1] = s->ndim == 2 ? s->shape[1] : 0;
    return CEPE_OK;
}

int cepe_model_on_device(const cepe_model *m) { return m && m->be->device; }

cepe_status cepe_model_weight_format(const cepe_model *m, int i, int *qtype, size_t *nbytes) {
    if (!m || !qtype || !nbytes)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_weight_format: NULL argument");
    if (i < 0 || i >= m->n_slots)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "weight index %d is outside [0, %d)", i, m->n_slots);
    const weight_slot *s = &m->slots[i];
    *qtype = s->q ? (int)s->q->type : CEPE_QTYPE_F32;
    *nbytes = s->q ? (size_t)s->q->n_out * s->q->row_stride : slot_numel(s) * sizeof(float);
    return CEPE_OK;
}

cepe_status cepe_model_read_weight(const cepe_model *m, int i, float *dst) {
    if (!m || !dst) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_read_weight: NULL argument");
    if (i < 0 || i >= m->n_slots)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "weight index %d is outside [0, %d)", i, m->n_slots);
    const weight_slot *s = &m->slots[i];
    if (!slot_data(s)) return cepe_fail(CEPE_ERR_STATE, "tensor %s is not bound", s->name);
    if (m->bf16)
        return cepe_fail(CEPE_ERR_UNSUPPORTED, "the weights of a bf16 model cannot be read back as float32");
    if (s->q && s->q->type != CEPE_QTYPE_F32) { /* a stored format, on the CPU */
        for (int r = 0; r < s->q->n_out; r++) {
            cepe_status st = cepe_dequantize_row(
                (int)s->q->type, (const unsigned char *)s->q->data + (size_t)r * s->q->row_stride,
                dst + (size_t)r * s->q->n_in, s->q->n_in);
            if (st) return st;
        }
        return CEPE_OK;
    }
    m->be->download(m->be, dst, slot_data(s), slot_numel(s) * sizeof(float));
    return backend_check(m->be);
}

/* ------------------------------------------------------------------ create */

static cepe_status check_config(const cepe_train_config *c) {
    if (!(c->lr >= 0.0 && isfinite(c->lr)))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "lr must be finite and >= 0");
    if (!(c->weight_decay >= 0.0 && isfinite(c->weight_decay)))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "weight_decay must be finite and >= 0");
    if (!(c->warmup_ratio >= 0.0 && c->warmup_ratio <= 1.0))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "warmup_ratio must be in [0, 1], got %g", c->warmup_ratio);
    if (c->total_steps < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "total_steps must be >= 1, got %ld", c->total_steps);
    if (!(c->adam.beta1 >= 0.0 && c->adam.beta1 < 1.0 && c->adam.beta2 >= 0.0 && c->adam.beta2 < 1.0))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "betas must be in [0, 1), got (%g, %g)", c->adam.beta1,
                         c->adam.beta2);
    if (!(c->adam.eps > 0.0)) return cepe_fail(CEPE_ERR_INVALID_ARG, "eps must be > 0, got %g", c->adam.eps);
    if (isnan(c->clip)) return cepe_fail(CEPE_ERR_INVALID_ARG, "clip must be a number");
    if (!(isfinite(c->lm_loss_cof) && isfinite(c->kl_loss_cof)))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "lm_loss_cof and kl_loss_cof must be finite");
    if (c->kl_mode != 0 && c->kl_mode != 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "kl_mode must be 0 (smooth) or 1 (drop), got %d", c->kl_mode);
    if (!(c->kl_delta >= 0.0 && isfinite(c->kl_delta)))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "the smoothing delta must be finite and >= 0, got %g",
                         c->kl_delta);
    if (c->logit_floats < 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "logit_floats must be >= 0 (0 = default), got %ld",
                         c->logit_floats);
    return CEPE_OK;
}

void cepe_train_config_init(cepe_train_config *c) {
    *c = (cepe_train_config){.trainable = CEPE_TRAIN_CROSS_ATTN,
                             .lr = 1e-4,
                             .total_steps = 1,
                             .clip = 1.0,
                             .adam = {0.9, 0.999, 1e-8},
                             .lm_loss_cof = 1.0};
}

cepe_status cepe_train_create(const cepe_model *m, const cepe_train_config *c, float *params, float *adam_m,
                              float *adam_v, long step, cepe_train **out) {
    if (!m || !c || !params || !adam_m || !adam_v || !out)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_create: NULL argument");
    *out = NULL;
    if (!m->finalized) return cepe_fail(CEPE_ERR_STATE, "the model has unbound weights (call finalize)");
    if (step < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "step must be >= 0, got %ld", step);
    if (m->bf16)
        return cepe_fail(CEPE_ERR_UNSUPPORTED, "bf16 weights are for inference: train a float32 model");
    cepe_status st = check_which(m, c->trainable);
    if (st || (st = check_config(c))) return st;

    cepe_train *t = cepe_calloc(1, sizeof *t);
    if (!t) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory creating the training state");
    t->m = m;
    t->cfg = *c;
    t->n_threads = m->n_threads;
    t->params = params;
    t->adam_m = adam_m;
    t->adam_v = adam_v;
    t->step = step;
    t->n_tensors = build_layout(m, c->trainable, NULL, &t->n_params);
    t->tensors = cepe_calloc((size_t)(t->n_tensors > 0 ? t->n_tensors : 1), sizeof *t->tensors);
    const cepe_backend *be = m->be;
    const size_t n_alloc = t->n_params ? t->n_params : 1;
    t->grads = be->alloc(be, cepe_mul_size(n_alloc, sizeof(float)));
    t->norm_partial =
        be->alloc(be, cepe_mul_size((n_alloc + CEPE_NORM_CHUNK - 1) / CEPE_NORM_CHUNK, sizeof(double)));
    t->dm = be->device ? be->alloc(be, cepe_mul_size(n_alloc, sizeof(float))) : adam_m;
    t->dv = be->device ? be->alloc(be, cepe_mul_size(n_alloc, sizeof(float))) : adam_v;
    t->dec = cepe_calloc((size_t)m->cfg.n_layers, sizeof *t->dec);
    t->enc = cepe_calloc(m->has_encoder ? (size_t)m->enc_cfg.n_layers : 1, sizeof *t->enc);
    t->qwork = m->qwork_size ? cepe_calloc(m->qwork_size, 1) : NULL;
    if ((m->qwork_size && !t->qwork) || !t->tensors || !t->grads || !t->norm_partial || !t->dm || !t->dv ||
        !t->dec || !t->enc) {
        st = cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory for %zu gradients", t->n_params);
        goto fail;
    }
    build_layout(m, c->trainable, t->tensors, &t->n_params);

    /* The gradient views: a second model over the same config, binding each
     * trainable name to its slice of the gradient buffer. */
    if ((st = cepe_model_create(&m->cfg, m->has_encoder ? &m->enc_cfg : NULL, 1, &t->gm))) goto fail;
    for (int i = 0; i < t->n_tensors; i++) {
        const train_tensor *tt = &t->tensors[i];
        const weight_slot *s = &m->slots[tt->slot];
        if (be->device) { /* the trainable weights' device copies start from the master weights */
            if (be->upload(be, (float *)(void *)slot_data(s), params + tt->offset, tt->n * sizeof(float))) {
                st = cepe_fail(CEPE_ERR_BACKEND, "copying %s to the device failed", s->name);
                goto fail;
            }
        } else if (s->q && s->q->type != CEPE_QTYPE_F32) {
            st = cepe_fail(CEPE_ERR_INVALID_ARG,
                           "trainable tensor %s is bound as %s: trainable weights are float32", s->name,
                           cepe_qtype_name(s->q->type));
            goto fail;
        } else if (slot_data(s) != params + tt->offset) {
            st = cepe_fail(
                CEPE_ERR_INVALID_ARG,
                "trainable tensor %s is not bound to the params buffer at offset %zu (bind the model's "
                "trainable weights to views of params)",
                s->name, tt->offset);
            goto fail;
        }
        if ((st = cepe_model_bind(t->gm, s->name, t->grads + tt->offset, s->ndim, s->shape))) goto fail;
    }
    if (m->cfg.tie_word_embeddings) t->gm->w.lm_head = t->gm->w.embed; /* both uses feed one gradient */
    /* Does anything in the decoder proper train (then the backward runs down
     * to the embedding), or only cross-attention (it stops at the first
     * cross-attention layer: nothing below it has a trainable weight)? */
    t->train_decoder = c->trainable == CEPE_TRAIN_ALL;
    t->train_encoder = m->has_encoder && c->trainable != CEPE_TRAIN_CROSS_ATTN;
    if (be->device) {
        be->upload(be, t->dm, adam_m, t->n_params * sizeof(float));
        be->upload(be, t->dv, adam_v, t->n_params * sizeof(float));
    }
    if ((st = train_check(t))) goto fail;
    *out = t;
    return CEPE_OK;
fail:
    cepe_train_free(t);
    return st;
}

void cepe_train_free(cepe_train *t) {
    if (!t) return;
    const cepe_backend *be = t->m->be;
    cepe_model_free(t->gm);
    cepe_free(t->qwork);
    cepe_free(t->tensors);
    be->free(be, t->grads);
    be->free(be, t->norm_partial);
    if (be->device) be->free(be, t->dm), be->free(be, t->dv);
    cepe_free(t->dec);
    cepe_free(t->enc);
    be->free(be, t->arena);
    cepe_free(t->host_arena);
    cepe_free(t);
}

void cepe_train_zero_grad(cepe_train *t) {
    if (t) t->m->be->fill(t->m->be, t->grads, 0, sizeof(float) * t->n_params);
}

cepe_status cepe_train_copy_grads(const cepe_train *t, float *dst) {
    if (!t || !dst) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_copy_grads: NULL argument");
    t->m->be->download(t->m->be, dst, t->grads, sizeof(float) * t->n_params);
    return train_check(t);
}

cepe_status cepe_train_grad_buffer(cepe_train *t, float **grads, size_t *n, int *on_device) {
    if (!t || !grads || !n || !on_device)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_grad_buffer: NULL argument");
    *grads = t->grads;
    *n = t->n_params;
    *on_device = t->m->be->device;
    return CEPE_OK;
}

cepe_status cepe_train_sync_device(cepe_train *t) {
    if (!t) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_sync_device: NULL state");
    const cepe_backend *be = t->m->be;
    if (!be->device) return CEPE_OK;
    be->upload(be, t->dm, t->adam_m, sizeof(float) * t->n_params);
    be->upload(be, t->dv, t->adam_v, sizeof(float) * t->n_params);
    for (int i = 0; i < t->n_tensors; i++) {
        const train_tensor *tt = &t->tensors[i];
        be->upload(be, (float *)(void *)slot_data(&t->m->slots[tt->slot]), t->params + tt->offset,
                   sizeof(float) * tt->n);
    }
    return train_check(t);
}

cepe_status cepe_train_sync_host(cepe_train *t) {
    if (!t) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_sync_host: NULL state");
    const cepe_backend *be = t->m->be;
    if (!be->device) return CEPE_OK; /* the caller's buffers are the state */
    be->download(be, t->adam_m, t->dm, sizeof(float) * t->n_params);
    be->download(be, t->adam_v, t->dv, sizeof(float) * t->n_params);
    for (int i = 0; i < t->n_tensors; i++) {
        const train_tensor *tt = &t->tensors[i];
        be->download(be, t->params + tt->offset, slot_data(&t->m->slots[tt->slot]), sizeof(float) * tt->n);
    }
    return train_check(t);
}
long cepe_train_steps(const cepe_train *t) { return t ? t->step : 0; }
void cepe_train_set_steps(cepe_train *t, long step) {
    if (t && step >= 0) t->step = step;
}

/* ------------------------------------------------------------------ update */

cepe_status cepe_train_update(cepe_train *t, cepe_train_stats *out) {
    if (!t) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_train_update: NULL state");
    const cepe_train_config *c = &t->cfg;
    const cepe_backend *be = t->m->be;
    const int nt = t->n_threads;
    const double lr =
        cepe_lr_at(c->lr, t->step, cepe_warmup_steps(c->warmup_ratio, c->total_steps), c->total_steps);
    /* the global norm: chunk sums on the backend, added here in chunk order
     * (cepe_grad_norm's order: the same bits on every backend and thread count) */
    const size_t n_chunks = (t->n_params + CEPE_NORM_CHUNK - 1) / CEPE_NORM_CHUNK;
    double *partial = cepe_calloc(n_chunks ? n_chunks : 1, sizeof(double));
    if (!partial) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory for the gradient norm");
    be->sumsq_chunks(be, t->norm_partial, t->grads, t->n_params, nt);
    be->download(be, partial, t->norm_partial, n_chunks * sizeof(double));
    double total = 0.0;
    for (size_t i = 0; i < n_chunks; i++) total += partial[i];
    cepe_free(partial);
    cepe_status st = train_check(t);
    if (st) return st;
    const double norm = sqrt(total);
    if (!isfinite(norm))
        return cepe_fail(
            CEPE_ERR_NUMERIC,
            "the gradient norm is %g: no update made (step %ld): the gradients overflowed float32 "
            "(a loss coefficient far too large, or weights that make the loss overflow)",
            norm, t->step);
    if (c->clip > 0.0) { /* torch: clip_coef = max_norm / (total_norm + 1e-6) in float32, clamped to 1 */
        const float coef = (float)(c->clip / ((double)(float)norm + 1e-6));
        if (coef < 1.0f) be->scale(be, t->grads, coef, t->n_params, nt);
    }
    for (int i = 0; i < t->n_tensors; i++) {
        const train_tensor *tt = &t->tensors[i];
        cepe_adamw_scalars_t s;
        cepe_adamw_scalars(lr, &c->adam, tt->decay ? c->weight_decay : 0.0, t->step + 1, &s);
        float *p = (float *)(void *)slot_data(
            &t->m->slots[tt->slot]); /* params + offset on the CPU (checked at create) */
        be->adamw(be, p, t->grads + tt->offset, t->dm + tt->offset, t->dv + tt->offset, tt->n, s.decay, s.w1,
                  s.b2, s.w2, s.bc2_sqrt, s.neg_step, s.eps, nt);
    }
    if ((st = train_check(t))) return st;
    t->step++;
    if (out) {
        out->grad_norm = norm;
        out->lr = lr;
    }
    return CEPE_OK;
}
