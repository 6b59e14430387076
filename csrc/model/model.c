/* model.c — creating a decoder from a config, binding its weights by HF name,
 * and checking that nothing is missing. */
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "../common.h"
#include "model.h"

static cepe_status check_config(const cepe_config *c) {
#define POSITIVE(field)                                                                                      \
    if (c->field < 1)                                                                                        \
    return cepe_fail(CEPE_ERR_INVALID_ARG, "config: " #field " must be >= 1, got %d", c->field)
    POSITIVE(vocab_size);
    POSITIVE(hidden_size);
    POSITIVE(intermediate_size);
    POSITIVE(n_layers);
    POSITIVE(n_heads);
    POSITIVE(n_kv_heads);
    POSITIVE(head_dim);
#undef POSITIVE
    if (c->n_heads % c->n_kv_heads != 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "config: num_attention_heads (%d) must be a multiple of num_key_value_heads (%d)",
                         c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "config: head_dim must be even for RoPE, got %d", c->head_dim);
    if (c->head_dim > CEPE_MAX_HEAD_DIM)
        return cepe_fail(CEPE_ERR_UNSUPPORTED, "config: head_dim %d is larger than the supported %d",
                         c->head_dim, CEPE_MAX_HEAD_DIM);
    if (!(c->rms_norm_eps > 0.0f))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "config: rms_norm_eps must be > 0, got %g",
                         (double)c->rms_norm_eps);
    if (c->sliding_window < 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "config: sliding_window must be >= 0, got %d",
                         c->sliding_window);
    if (c->n_cross_layers < 0 || c->n_cross_layers > c->n_layers)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "config: num_cross_attn_layers must be in [0, %d], got %d",
                         c->n_layers, c->n_cross_layers);
    if (c->n_cross_layers > 0 && c->encoder_hidden_size < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "config: encoder_hidden_size must be >= 1, got %d",
                         c->encoder_hidden_size);
    return CEPE_OK;
}

/* ------------------------------------------------------------- parameters */

/* A dimension of a parameter, read from the config it belongs to. */
typedef enum { DIM_NONE, DIM_D, DIM_QD, DIM_KVD, DIM_FF, DIM_VOCAB, DIM_D_ENC } param_dim;

/* One parameter: its HF name (after the prefix), its shape, and where in the
 * struct it belongs to (a layer_weights, or the cepe_model) its data goes:
 * a cepe_qtensor for a matrix, a const float * for a 1-D norm. */
typedef struct {
    const char *name;
    param_dim d0, d1;
    size_t field;
} param_decl;

#define LAYER(f) offsetof(layer_weights, f)
/* A LLaMA block (decoder and encoder alike), under "model.layers.<i>." or
 * "encoder.layers.<i>.". */
static const param_decl BLOCK_PARAMS[] = {
    {"input_layernorm.weight", DIM_D, DIM_NONE, LAYER(attn_norm)},
    {"self_attn.q_proj.weight", DIM_QD, DIM_D, LAYER(wq)},
    {"self_attn.k_proj.weight", DIM_KVD, DIM_D, LAYER(wk)},
    {"self_attn.v_proj.weight", DIM_KVD, DIM_D, LAYER(wv)},
    {"self_attn.o_proj.weight", DIM_D, DIM_QD, LAYER(wo)},
    {"post_attention_layernorm.weight", DIM_D, DIM_NONE, LAYER(ffn_norm)},
    {"mlp.gate_proj.weight", DIM_FF, DIM_D, LAYER(w_gate)},
    {"mlp.up_proj.weight", DIM_FF, DIM_D, LAYER(w_up)},
    {"mlp.down_proj.weight", DIM_D, DIM_FF, LAYER(w_down)},
};
/* CEPE cross-attention (spec §3), in the decoder's top n_cross_layers blocks. */
static const param_decl CROSS_PARAMS[] = {
    {"cross_attn.layernorm.weight", DIM_D, DIM_NONE, LAYER(cross_norm)},
    {"cross_attn.q_proj.weight", DIM_QD, DIM_D, LAYER(cross_wq)},
    {"cross_attn.k_proj.weight", DIM_KVD, DIM_D_ENC, LAYER(cross_wk)},
    {"cross_attn.v_proj.weight", DIM_KVD, DIM_D_ENC, LAYER(cross_wv)},
    {"cross_attn.o_proj.weight", DIM_D, DIM_QD, LAYER(cross_wo)},
};
#undef LAYER
#define MODEL(f) offsetof(cepe_model, f)
/* Outside the blocks; lm_head only when untied (it is the last entry). */
static const param_decl DECODER_PARAMS[] = {
    {"model.embed_tokens.weight", DIM_VOCAB, DIM_D, MODEL(w.embed)},
    {"model.norm.weight", DIM_D, DIM_NONE, MODEL(w.final_norm)},
    {"lm_head.weight", DIM_VOCAB, DIM_D, MODEL(w.lm_head)},
};
static const param_decl ENCODER_PARAMS[] = {
    {"encoder.embed_tokens.weight", DIM_VOCAB, DIM_D, MODEL(enc.embed)},
    {"encoder.norm.weight", DIM_D, DIM_NONE, MODEL(enc.final_norm)},
};
#undef MODEL
#define N_PARAMS(table) (sizeof(table) / sizeof(table[0]))

static int64_t dim_of(param_dim k, const cepe_config *c) {
    switch (k) {
    case DIM_D:
        return c->hidden_size;
    case DIM_QD:
        return (int64_t)c->n_heads * c->head_dim;
    case DIM_KVD:
        return (int64_t)c->n_kv_heads * c->head_dim;
    case DIM_FF:
        return c->intermediate_size;
    case DIM_VOCAB:
        return c->vocab_size;
    case DIM_D_ENC:
        return c->encoder_hidden_size;
    case DIM_NONE:
        break;
    }
    return 0;
}

/* Slots of the first n entries of table under prefix, their data in base
 * (a layer_weights or the cepe_model). Nonzero when m->slots is full or a
 * name does not fit: a table and the count made from it disagree. */
static int add_params(cepe_model *m, const param_decl *table, size_t n, const char *prefix,
                      const cepe_config *c, void *base) {
    for (size_t i = 0; i < n; i++) {
        const param_decl *p = &table[i];
        if (m->n_slots >= m->cap_slots) return 1;
        weight_slot *s = &m->slots[m->n_slots];
        const int len = snprintf(s->name, sizeof s->name, "%s%s", prefix, p->name);
        if (len < 0 || (size_t)len >= sizeof s->name) return 1;
        s->ndim = p->d1 == DIM_NONE ? 1 : 2;
        s->shape[0] = dim_of(p->d0, c);
        s->shape[1] = dim_of(p->d1, c);
        if (s->ndim == 2)
            s->q = (cepe_qtensor *)((char *)base + p->field);
        else
            s->dst = (const float **)((char *)base + p->field);
        m->n_slots++;
    }
    return 0;
}

/* Slots of every parameter m has: the decoder's, its blocks' (with
 * cross-attention from first_cross up), the encoder's when ec. */
static int add_all_params(cepe_model *m, const cepe_config *ec) {
    const cepe_config *c = &m->cfg;
    char prefix[64];
    int bad =
        add_params(m, DECODER_PARAMS, N_PARAMS(DECODER_PARAMS) - (c->tie_word_embeddings ? 1 : 0), "", c, m);
    for (int i = 0; i < c->n_layers && !bad; i++) {
        snprintf(prefix, sizeof prefix, "model.layers.%d.", i);
        bad |= add_params(m, BLOCK_PARAMS, N_PARAMS(BLOCK_PARAMS), prefix, c, &m->w.layers[i]);
        if (i >= m->first_cross)
            bad |= add_params(m, CROSS_PARAMS, N_PARAMS(CROSS_PARAMS), prefix, c, &m->w.layers[i]);
    }
    if (!ec) return bad;
    bad |= add_params(m, ENCODER_PARAMS, N_PARAMS(ENCODER_PARAMS), "", ec, m);
    for (int j = 0; j < ec->n_layers && !bad; j++) {
        snprintf(prefix, sizeof prefix, "encoder.layers.%d.", j);
        bad |= add_params(m, BLOCK_PARAMS, N_PARAMS(BLOCK_PARAMS), prefix, ec, &m->enc.layers[j]);
    }
    return bad;
}

/* Slots the tables above make for c (and encoder ec). */
static size_t count_params(const cepe_config *c, const cepe_config *ec) {
    size_t n = N_PARAMS(DECODER_PARAMS) + (size_t)c->n_layers * N_PARAMS(BLOCK_PARAMS) +
               (size_t)c->n_cross_layers * N_PARAMS(CROSS_PARAMS);
    if (ec) n += N_PARAMS(ENCODER_PARAMS) + (size_t)ec->n_layers * N_PARAMS(BLOCK_PARAMS);
    return n;
}

static cepe_status add_encoder(cepe_model *m, const cepe_config *ec) {
    cepe_config c = *ec;
    c.n_cross_layers = 0;
    c.tie_word_embeddings = 0;
    c.sliding_window = 0;
    cepe_status st = check_config(&c);
    if (st) { /* re-label the message: it is about the encoder */
        char msg[400];
        const char *e = cepe_last_error();
        snprintf(msg, sizeof msg, "%s", strncmp(e, "config: ", 8) ? e : e + 8);
        return cepe_fail(st, "encoder_config: %s", msg);
    }
    if (m->cfg.n_cross_layers > 0 && m->cfg.encoder_hidden_size != c.hidden_size)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "config: encoder_hidden_size (%d) differs from encoder_config.hidden_size (%d)",
                         m->cfg.encoder_hidden_size, c.hidden_size);
    m->enc_cfg = c;
    m->has_encoder = 1;
    m->enc.layers = cepe_calloc((size_t)c.n_layers, sizeof(layer_weights));
    if (!m->enc.layers) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory creating the encoder");
    st = cepe_rope_setup(&c, &m->enc_rope);
    if (st) return cepe_fail(st, "encoder_config: %.400s", cepe_last_error());
    return CEPE_OK;
}

cepe_status backend_check(const cepe_backend *be) {
    char msg[400] = {0};
    const int st = be->sync(be, msg, sizeof msg);
    if (!st) return CEPE_OK;
    return cepe_fail(st > 0 && st <= CEPE_ERR_BACKEND ? (cepe_status)st : CEPE_ERR_BACKEND, "%s backend: %s",
                     be->name, msg[0] ? msg : "unknown failure");
}

cepe_status backend_fail(const cepe_backend *be) {
    const cepe_status st = backend_check(be);
    return st ? st : cepe_fail(CEPE_ERR_BACKEND, "%s backend: an op failed", be->name);
}

cepe_status cepe_model_create(const cepe_config *cfg, const cepe_config *encoder_cfg, int n_threads,
                              cepe_model **out) {
    return cepe_model_create_on(cfg, encoder_cfg, n_threads, NULL, out);
}

const char *cepe_model_backend_name(const cepe_model *m) { return m ? m->be->name : NULL; }

cepe_status cepe_model_create_on(const cepe_config *cfg, const cepe_config *encoder_cfg, int n_threads,
                                 const cepe_backend *be, cepe_model **out) {
    if (!cfg || !out) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_create: NULL argument");
    if (be && be->abi != CEPE_BACKEND_ABI)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "backend %s was built for op table ABI %d, this core has %d",
                         be->name ? be->name : "?", be->abi, CEPE_BACKEND_ABI);
    *out = NULL;
    if (n_threads < 1 || n_threads > CEPE_MAX_THREADS)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "n_threads must be in [1, %d], got %d", CEPE_MAX_THREADS,
                         n_threads);
    cepe_status st = check_config(cfg);
    if (st) return st;
    if (encoder_cfg) { /* before its sizes are used to count weight slots */
        cepe_config ec = *encoder_cfg;
        ec.n_cross_layers = 0;
        ec.sliding_window = 0;
        if ((st = check_config(&ec))) {
            char msg[400];
            snprintf(msg, sizeof msg, "%s", cepe_last_error());
            return cepe_fail(st, "encoder_config: %s", strncmp(msg, "config: ", 8) ? msg : msg + 8);
        }
    }

    cepe_model *m = cepe_calloc(1, sizeof *m);
    if (!m) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory creating the model");
    m->cfg = *cfg;
    m->n_threads = n_threads;
    cepe_set_blas_threads(1); /* threads come from our OpenMP team (matmul.c) */
    m->be = be ? be : cepe_backend_cpu();
    const int L = cfg->n_layers;
    const size_t n_slots = count_params(cfg, encoder_cfg);
    m->w.layers = cepe_calloc((size_t)L, sizeof(layer_weights));
    m->slots = n_slots > INT_MAX ? NULL : cepe_calloc(n_slots, sizeof(weight_slot));
    m->cap_slots = (int)n_slots;
    if (!m->w.layers || !m->slots) {
        st = cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory creating the model");
        goto fail;
    }
    st = cepe_rope_setup(cfg, &m->rope);
    if (st) goto fail;

    m->first_cross = L - cfg->n_cross_layers;
    if (encoder_cfg && (st = add_encoder(m, encoder_cfg))) goto fail;
    if (add_all_params(m, encoder_cfg ? &m->enc_cfg : NULL)) {
        st = cepe_fail(CEPE_ERR_STATE, "internal: the weight table overflows its %d slots", m->cap_slots);
        goto fail;
    }
    *out = m;
    return CEPE_OK;
fail:
    cepe_model_free(m);
    return st;
}

void cepe_model_free(cepe_model *m) {
    if (!m) return;
    for (int i = 0; m->slots && i < m->n_slots; i++) m->be->free(m->be, m->slots[i].owned);
    cepe_free(m->w.layers);
    cepe_free(m->enc.layers);
    cepe_free(m->slots);
    cepe_rope_release(&m->rope);
    cepe_rope_release(&m->enc_rope);
    cepe_free(m);
}

static void format_shape(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t used = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < ndim && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (used < n) snprintf(buf + used, n - used, ndim == 1 ? ",)" : ")");
}

/* Embedding tables stay fp32 under bf16: rows are gathered, not multiplied. */
static int keeps_fp32(const weight_slot *s) {
    const size_t n = strlen(s->name), k = strlen("embed_tokens.weight");
    return s->ndim != 2 || (n >= k && strcmp(s->name + n - k, "embed_tokens.weight") == 0);
}

/* The device copy of one tensor into s->owned: fp32, or bf16 (rounded on the
 * device) for a bf16 model's linear weights. A stored format is widened to
 * fp32 on the host first: device kernels multiply fp32 or bf16. */
static cepe_status upload_slot(cepe_model *m, weight_slot *s, const void *data, int qtype, size_t n) {
    const cepe_backend *be = m->be;
    const size_t bytes = cepe_mul_size(n, sizeof(float));
    const int half = m->bf16 && !keeps_fp32(s);
    float *wide = NULL;
    if (qtype != CEPE_QTYPE_F32) {
        const int64_t n_in = s->shape[1];
        wide = bytes == SIZE_MAX ? NULL : cepe_calloc(n, sizeof(float));
        if (!wide) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory widening tensor %s", s->name);
        const size_t rb = cepe_qtype_row_bytes(qtype, n_in);
        for (int64_t r = 0; r < s->shape[0]; r++)
            if (cepe_dequantize_row(qtype, (const unsigned char *)data + (size_t)r * rb,
                                    wide + (size_t)r * n_in, n_in)) {
                cepe_free(wide);
                return cepe_fail(CEPE_ERR_INVALID_ARG, "tensor %s: %s", s->name, cepe_last_error());
            }
        data = wide;
    }
    float *dev = bytes == SIZE_MAX ? NULL : be->alloc(be, bytes);
    uint16_t *dev16 = half && dev ? be->alloc(be, n * sizeof(uint16_t)) : NULL;
    if (!dev || (half && !dev16)) {
        be->free(be, dev);
        cepe_free(wide);
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of %s memory for tensor %s", be->name, s->name);
    }
    int bad = be->upload(be, dev, data, bytes);
    if (half && !bad) bad = be->to_bf16(be, dev16, dev, n);
    cepe_status st = backend_check(be); /* waits: the fp32 staging copy may go */
    cepe_free(wide);
    if (!st && bad) st = cepe_fail(CEPE_ERR_BACKEND, "copying tensor %s to the device failed", s->name);
    if (half) be->free(be, dev);
    if (st) {
        be->free(be, half ? (void *)dev16 : (void *)dev);
        return st;
    }
    be->free(be, s->owned);
    s->owned = half ? (void *)dev16 : (void *)dev;
    if (s->q) {
        s->q->type = half ? CEPE_QTYPE_BF16 : CEPE_QTYPE_F32;
        s->q->row_stride = (size_t)s->shape[1] * (half ? sizeof(uint16_t) : sizeof(float));
    }
    return CEPE_OK;
}

cepe_status cepe_model_set_bf16(cepe_model *m) {
    if (!m) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_set_bf16: NULL model");
    for (int i = 0; i < m->n_slots; i++)
        if (slot_data(&m->slots[i]))
            return cepe_fail(CEPE_ERR_STATE, "cepe_model_set_bf16: call it before binding weights");
    if (!m->be->device || !m->be->to_bf16 || !m->be->matmul_bf16)
        return cepe_fail(CEPE_ERR_UNSUPPORTED,
                         "bf16 weights need a device backend with bf16 GEMMs (%s has none)", m->be->name);
    m->bf16 = 1;
    return CEPE_OK;
}

cepe_status cepe_model_bind(cepe_model *m, const char *name, const float *data, int ndim,
                            const int64_t *shape) {
    return cepe_model_bind_q(m, name, data, CEPE_QTYPE_F32, ndim, shape);
}

cepe_status cepe_model_bind_q(cepe_model *m, const char *name, const void *data, int qtype, int ndim,
                              const int64_t *shape) {
    if (!m || !name || !data || (ndim > 0 && !shape))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_bind: NULL argument");
    if (m->finalized) return cepe_fail(CEPE_ERR_STATE, "cepe_model_bind: the model is already finalized");
    for (int i = 0; i < m->n_slots; i++) {
        weight_slot *s = &m->slots[i];
        if (strcmp(s->name, name) != 0) continue;
        int ok = ndim == s->ndim;
        for (int k = 0; ok && k < ndim; k++) ok = shape[k] == s->shape[k];
        if (!ok) {
            char want[64], got[64];
            format_shape(want, sizeof want, s->ndim, s->shape);
            format_shape(got, sizeof got, ndim < 0 ? 0 : (ndim > 8 ? 8 : ndim), shape);
            return cepe_fail(CEPE_ERR_INVALID_ARG, "tensor %s has shape %s, the config implies %s", name, got,
                             want);
        }
        if (qtype != CEPE_QTYPE_F32 && !s->q)
            return cepe_fail(CEPE_ERR_INVALID_ARG, "tensor %s is 1-D and must be bound as float32, not %s",
                             name, cepe_qtype_name(qtype) ? cepe_qtype_name(qtype) : "an unknown type");
        cepe_qtensor q = {.type = (cepe_qtype)qtype,
                          .n_out = (int)s->shape[0],
                          .n_in = s->q ? (int)s->shape[1] : (int)s->shape[0],
                          .data = data};
        q.row_stride = cepe_qtype_row_bytes(qtype, q.n_in);
        cepe_status st = cepe_qtensor_check(&q);
        if (st) return cepe_fail(st, "tensor %s: %s", name, cepe_last_error());
        if (m->be->device) { /* a device copy, owned by the slot */
            if (s->q) *s->q = q;
            size_t n = (size_t)s->shape[0] * (s->ndim == 2 ? (size_t)s->shape[1] : 1);
            if ((st = upload_slot(m, s, data, qtype, n))) return st;
            data = s->owned;
            q = s->q ? *s->q : q;
            q.data = data;
        }
        if (s->q)
            *s->q = q;
        else
            *s->dst = data;
        return CEPE_OK;
    }
    return cepe_fail(CEPE_ERR_INVALID_ARG, "unexpected tensor %s: no such weight in this model", name);
}

cepe_status cepe_model_finalize(cepe_model *m) {
    if (!m) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_model_finalize: NULL model");
    for (int i = 0; i < m->n_slots; i++)
        if (!slot_data(&m->slots[i]))
            return cepe_fail(CEPE_ERR_MISSING_WEIGHT, "missing tensor %s", m->slots[i].name);
    if (m->cfg.tie_word_embeddings) m->w.lm_head = m->w.embed;
    m->qwork_size = model_qwork_size(m);
    m->finalized = 1;
    return CEPE_OK;
}

const cepe_config *cepe_model_config(const cepe_model *m) { return m ? &m->cfg : NULL; }
const cepe_config *cepe_model_encoder_config(const cepe_model *m) {
    return m && m->has_encoder ? &m->enc_cfg : NULL;
}
