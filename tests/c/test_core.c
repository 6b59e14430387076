/* test_core.c — the C core exercised without Python, for valgrind/ASan:
 * every public entry point on a tiny random CEPE model, its error paths, and
 * self-consistency checks (incremental decoding == full recompute, a padded
 * context token changes nothing, a fully masked row is finite). Exits non-zero
 * on the first failure; prints "N passed, 0 failed" at the end. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cepe.h"
#include "model/model.h" /* cepe_ctx_forward_continue: an interrupt already pending */

#include "check.h"

/* ---------------------------------------------------------------- weights */

static uint64_t rng_state = 42;
static float frand(void) { /* uniform in [-0.3, 0.3) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return ((float)(rng_state >> 40) / (float)(1ull << 24) - 0.5f) * 0.6f;
}

#define MAX_W 256
static float *weights[MAX_W];
static int n_weights = 0;

static void bind(cepe_model *m, const char *name, int64_t d0, int64_t d1) {
    const int64_t shape[2] = {d0, d1};
    const int ndim = d1 > 0 ? 2 : 1;
    const int64_t n = d0 * (d1 > 0 ? d1 : 1);
    float *w = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) w[i] = ndim == 1 ? 1.0f + frand() : frand();
    weights[n_weights++] = w;
    CHECK(cepe_model_bind(m, name, w, ndim, shape) == CEPE_OK);
}

static void bind_block(cepe_model *m, const char *prefix, const cepe_config *c) {
    char name[128];
    const int d = c->hidden_size, ff = c->intermediate_size;
    const int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
#define B(suffix, d0, d1)                                                                                    \
    snprintf(name, sizeof name, "%s%s", prefix, suffix);                                                     \
    bind(m, name, d0, d1)
    B("input_layernorm.weight", d, 0);
    B("self_attn.q_proj.weight", qd, d);
    B("self_attn.k_proj.weight", kvd, d);
    B("self_attn.v_proj.weight", kvd, d);
    B("self_attn.o_proj.weight", d, qd);
    B("post_attention_layernorm.weight", d, 0);
    B("mlp.gate_proj.weight", ff, d);
    B("mlp.up_proj.weight", ff, d);
    B("mlp.down_proj.weight", d, ff);
#undef B
}

static cepe_model *make_model(const cepe_config *dec, const cepe_config *enc) {
    cepe_model *m = NULL;
    CHECK(cepe_model_create(dec, enc, 2, &m) == CEPE_OK);
    char name[128];
    bind(m, "model.embed_tokens.weight", dec->vocab_size, dec->hidden_size);
    bind(m, "model.norm.weight", dec->hidden_size, 0);
    bind(m, "lm_head.weight", dec->vocab_size, dec->hidden_size);
    for (int i = 0; i < dec->n_layers; i++) {
        snprintf(name, sizeof name, "model.layers.%d.", i);
        bind_block(m, name, dec);
        if (i < dec->n_layers - dec->n_cross_layers) continue;
        const int qd = dec->n_heads * dec->head_dim, kvd = dec->n_kv_heads * dec->head_dim;
        snprintf(name, sizeof name, "model.layers.%d.cross_attn.layernorm.weight", i);
        bind(m, name, dec->hidden_size, 0);
        snprintf(name, sizeof name, "model.layers.%d.cross_attn.q_proj.weight", i);
        bind(m, name, qd, dec->hidden_size);
        snprintf(name, sizeof name, "model.layers.%d.cross_attn.k_proj.weight", i);
        bind(m, name, kvd, dec->encoder_hidden_size);
        snprintf(name, sizeof name, "model.layers.%d.cross_attn.v_proj.weight", i);
        bind(m, name, kvd, dec->encoder_hidden_size);
        snprintf(name, sizeof name, "model.layers.%d.cross_attn.o_proj.weight", i);
        bind(m, name, dec->hidden_size, qd);
    }
    bind(m, "encoder.embed_tokens.weight", enc->vocab_size, enc->hidden_size);
    bind(m, "encoder.norm.weight", enc->hidden_size, 0);
    for (int j = 0; j < enc->n_layers; j++) {
        snprintf(name, sizeof name, "encoder.layers.%d.", j);
        bind_block(m, name, enc);
    }
    CHECK(cepe_model_finalize(m) == CEPE_OK);
    return m;
}

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float mx = 0.0f;
    for (size_t i = 0; i < n; i++) mx = fabsf(a[i] - b[i]) > mx ? fabsf(a[i] - b[i]) : mx;
    return mx;
}

/* ------------------------------------------------------------------ tests */

int main(void) {
    const cepe_config dec = {.vocab_size = 61,
                             .hidden_size = 32,
                             .intermediate_size = 48,
                             .n_layers = 3,
                             .n_heads = 4,
                             .n_kv_heads = 2,
                             .head_dim = 8,
                             .rms_norm_eps = 1e-5f,
                             .rope_theta = 10000.0,
                             .n_cross_layers = 2,
                             .encoder_hidden_size = 24};
    const cepe_config enc = {.vocab_size = 67,
                             .hidden_size = 24,
                             .intermediate_size = 40,
                             .n_layers = 2,
                             .n_heads = 3,
                             .n_kv_heads = 3,
                             .head_dim = 8,
                             .rms_norm_eps = 1e-6f,
                             .rope_theta = 5000.0};
    const int V = dec.vocab_size, B = 2, T = 9;

    /* config errors */
    cepe_model *bad = NULL;
    cepe_config broken = dec;
    broken.n_kv_heads = 3;
    CHECK(cepe_model_create(&broken, NULL, 1, &bad) == CEPE_ERR_INVALID_ARG && bad == NULL);
    CHECK(strstr(cepe_last_error(), "multiple") != NULL);
    CHECK(cepe_model_create(&dec, NULL, 0, &bad) == CEPE_ERR_INVALID_ARG);
    /* missing weights */
    CHECK(cepe_model_create(&dec, &enc, 1, &bad) == CEPE_OK);
    CHECK(cepe_model_finalize(bad) == CEPE_ERR_MISSING_WEIGHT);
    cepe_ctx *nope = NULL;
    CHECK(cepe_ctx_create(bad, 1, 4, &nope) == CEPE_ERR_STATE && nope == NULL);
    cepe_model_free(bad);

    cepe_model *m = make_model(&dec, &enc);

    /* a wrong shape and an unknown name are refused */
    const int64_t wrong[2] = {3, 3};
    float tmp[9] = {0};
    CHECK(cepe_model_bind(m, "model.norm.weight", tmp, 2, wrong) == CEPE_ERR_STATE); /* finalized */

    int32_t ids[2 * 9];
    uint8_t mask[2 * 9];
    for (int i = 0; i < B * T; i++) {
        ids[i] = (int32_t)(3 + (i * 7) % (V - 3));
        mask[i] = 1;
    }
    mask[T + 0] = mask[T + 1] = 0; /* row 1 left-padded by 2 */

    /* full forward vs incremental decoding through the cache */
    float *full = malloc(sizeof(float) * (size_t)B * T * V);
    float *step = malloc(sizeof(float) * (size_t)B * V);
    cepe_ctx *c = NULL;
    CHECK(cepe_ctx_create(m, B, T + 8, &c) == CEPE_OK);
    CHECK(cepe_ctx_forward(c, ids, NULL, mask, T, full, CEPE_LOGITS_ALL) == CEPE_OK);
    for (int i = 0; i < B * T * V; i++) CHECK(isfinite(full[i]));
    cepe_ctx_reset(c);
    int32_t part[2 * 5];
    uint8_t pmask[2 * 5];
    for (int b = 0; b < B; b++)
        for (int t = 0; t < 5; t++) part[b * 5 + t] = ids[b * T + t], pmask[b * 5 + t] = mask[b * T + t];
    CHECK(cepe_ctx_forward(c, part, NULL, pmask, 5, NULL, CEPE_LOGITS_NONE) == CEPE_OK);
    for (int t = 5; t < T; t++) {
        int32_t one[2] = {ids[t], ids[T + t]};
        uint8_t om[2] = {mask[t], mask[T + t]};
        CHECK(cepe_ctx_forward(c, one, NULL, om, 1, step, CEPE_LOGITS_LAST) == CEPE_OK);
        for (int b = 0; b < B; b++)
            CHECK(max_abs_diff(step + b * V, full + ((size_t)b * T + t) * V, V) < 1e-4f);
    }
    CHECK(cepe_ctx_length(c) == T);

    /* bad inputs: out-of-range id, capacity, NULLs */
    int32_t oob[2] = {V, 0};
    CHECK(cepe_ctx_forward(c, oob, NULL, NULL, 1, NULL, CEPE_LOGITS_NONE) == CEPE_ERR_INVALID_ARG);
    CHECK(strstr(cepe_last_error(), "out of range") != NULL);
    CHECK(cepe_ctx_forward(c, ids, NULL, NULL, T, NULL, CEPE_LOGITS_NONE) == CEPE_ERR_STATE);
    CHECK(cepe_ctx_forward(c, NULL, NULL, NULL, 1, NULL, CEPE_LOGITS_NONE) == CEPE_ERR_INVALID_ARG);
    CHECK(cepe_ctx_forward(c, ids, NULL, NULL, 1, NULL, CEPE_LOGITS_ALL) == CEPE_ERR_INVALID_ARG);
    double badpos[2] = {NAN, 0.0};
    CHECK(cepe_ctx_forward(c, ids, badpos, NULL, 1, NULL, CEPE_LOGITS_NONE) == CEPE_ERR_INVALID_ARG);

    /* generation: greedy, then sampled with a seed, twice the same */
    int32_t out1[2 * 6], out2[2 * 6];
    int n1 = 0, n2 = 0;
    const int32_t eos[1] = {2};
    cepe_sampling s = {.temperature = 0.0f,
                       .top_p = 1.0f,
                       .typical_p = 1.0f,
                       .repeat_penalty = 1.0f,
                       .seed = 7,
                       .eos_ids = eos,
                       .n_eos = 0,
                       .pad_token_id = 0};
    cepe_sampler *smp = NULL;
    CHECK(cepe_sampler_create(&s, B, V, &smp) == CEPE_OK);
    cepe_ctx_reset(c);
    CHECK(cepe_ctx_generate(c, smp, 6, out1, &n1, NULL) == CEPE_ERR_STATE); /* no prompt yet */
    CHECK(cepe_ctx_forward(c, ids, NULL, mask, T, NULL, CEPE_LOGITS_NONE) == CEPE_OK);
    CHECK(cepe_ctx_generate(c, smp, 6, out1, &n1, NULL) == CEPE_OK && n1 == 6);
    CHECK(cepe_sampler_generated(smp, 0) == 6 && cepe_sampler_finished(smp, 1) == CEPE_FINISH_NONE);
    cepe_sampler_free(smp);
    s.temperature = 0.9f, s.top_k = 5, s.top_p = 0.9f, s.min_p = 0.05f, s.n_eos = 1;
    s.repeat_penalty = 1.1f, s.presence_penalty = 0.5f, s.repeat_last_n = 4;
    const int32_t bias_ids[1] = {4};
    const float bias[1] = {-INFINITY};
    s.bias_ids = bias_ids, s.bias = bias, s.n_bias = 1;
    float lp[2][2 * 6], top_lp[2][2 * 6 * 3];
    int32_t top_ids[2][2 * 6 * 3];
    for (int rep = 0; rep < 2; rep++) {
        cepe_logprobs want = {lp[rep], 3, top_ids[rep], top_lp[rep]};
        CHECK(cepe_sampler_create(&s, B, V, &smp) == CEPE_OK);
        cepe_ctx_reset(c);
        CHECK(cepe_ctx_forward(c, ids, NULL, mask, T, NULL, CEPE_LOGITS_NONE) == CEPE_OK);
        CHECK(cepe_sampler_accept(smp, ids, mask, T) == CEPE_OK);
        CHECK(cepe_ctx_generate(c, smp, 6, rep ? out2 : out1, rep ? &n2 : &n1, &want) == CEPE_OK);
        int32_t spare[2 * 2];
        int n_spare = 0;
        if (rep)
            CHECK(cepe_ctx_generate(c, smp, 2, spare, &n_spare, NULL) == CEPE_ERR_STATE); /* not fed back */
        cepe_sampler_free(smp);
    }
    CHECK(n1 == n2 && memcmp(out1, out2, sizeof(int32_t) * 2 * 6) == 0);
    for (int i = 0; i < B * n1; i++) {
        CHECK(out1[i] != 4);           /* banned */
        if (isnan(lp[0][i])) continue; /* a padded step */
        const float *t = top_lp[0] + i * 3;
        CHECK(lp[0][i] <= 0.0f && t[0] >= t[1] && t[1] >= t[2]);
        CHECK(lp[0][i] <= t[0] && lp[0][i] == lp[1][i]);
    }
    /* bad settings and a sampler of another shape */
    s.top_p = 0.0f;
    CHECK(cepe_sampler_create(&s, B, V, &smp) == CEPE_ERR_INVALID_ARG && strstr(cepe_last_error(), "top_p"));
    s.top_p = 0.9f;
    CHECK(cepe_sampler_create(&s, 1, V, &smp) == CEPE_OK);
    cepe_ctx_reset(c);
    CHECK(cepe_ctx_forward(c, ids, NULL, mask, T, NULL, CEPE_LOGITS_NONE) == CEPE_OK);
    CHECK(cepe_ctx_generate(c, smp, 2, out1, &n1, NULL) == CEPE_ERR_INVALID_ARG);
    cepe_sampler_free(smp);

    /* a stopped forward rolls back to where the call started */
    cepe_ctx_reset(c);
    CHECK(cepe_ctx_forward(c, part, NULL, pmask, 5, NULL, CEPE_LOGITS_NONE) == CEPE_OK);
    cepe_ctx_interrupt(c);
    CHECK(cepe_ctx_forward_continue(c, part, NULL, pmask, 1, NULL, CEPE_LOGITS_NONE) == CEPE_ERR_INTERRUPTED);
    CHECK(cepe_ctx_length(c) == 5);

    /* CEPE: encode chunks, attach, a padded context token changes nothing */
    const int n_chunks = 3, L = 5, N = n_chunks * L, de = enc.hidden_size;
    int32_t cids[3 * 5];
    uint8_t cmask[3 * 5];
    for (int i = 0; i < n_chunks * L; i++)
        cids[i] = (int32_t)(3 + (i * 5) % (enc.vocab_size - 3)), cmask[i] = 1;
    cmask[L + 0] = cmask[L + 1] = 0;     /* chunk 1 left-padded */
    memset(cmask + 2 * L, 0, (size_t)L); /* chunk 2 fully padded */
    float *E = malloc(sizeof(float) * (size_t)N * de);
    CHECK(cepe_model_encode(m, cids, cmask, n_chunks, L, E) == CEPE_OK);
    for (int i = 0; i < N * de; i++) CHECK(isfinite(E[i]));
    int32_t bad_cids[5] = {enc.vocab_size, 3, 3, 3, 3};
    CHECK(cepe_model_encode(m, bad_cids, NULL, 1, 5, E + 0 * 0) == CEPE_ERR_INVALID_ARG);
    CHECK(cepe_model_encode(m, cids, cmask, n_chunks, L, E) == CEPE_OK); /* E restored */

    float *states = malloc(sizeof(float) * (size_t)B * N * de);
    uint8_t smask[2 * 15];
    for (int b = 0; b < B; b++) {
        memcpy(states + (size_t)b * N * de, E, sizeof(float) * (size_t)N * de);
        memcpy(smask + b * N, cmask, (size_t)N);
    }
    float *a = malloc(sizeof(float) * (size_t)B * T * V), *b2 = malloc(sizeof(float) * (size_t)B * T * V);
    for (int keep = 0; keep < 2; keep++) {
        cepe_ctx_reset(c);
        CHECK(cepe_ctx_set_context(c, states, smask, N, keep) == CEPE_OK);
        CHECK(cepe_ctx_context_length(c) == N);
        CHECK(cepe_ctx_forward(c, ids, NULL, mask, T, keep ? b2 : a, CEPE_LOGITS_ALL) == CEPE_OK);
    }
    CHECK(max_abs_diff(a, b2, (size_t)B * T * V) < 1e-5f);   /* kept == recomputed K/V */
    CHECK(max_abs_diff(a, full, (size_t)B * T * V) > 1e-3f); /* the context matters */
    for (int b = 0; b < B; b++) /* change a padded context state: nothing moves */
        for (int k = 0; k < de; k++) states[(size_t)b * N * de + (size_t)(2 * L) * de + k] += 5.0f;
    cepe_ctx_reset(c);
    CHECK(cepe_ctx_set_context(c, states, smask, N, 1) == CEPE_OK);
    CHECK(cepe_ctx_forward(c, ids, NULL, mask, T, b2, CEPE_LOGITS_ALL) == CEPE_OK);
    CHECK(max_abs_diff(a, b2, (size_t)B * T * V) < 1e-5f);
    CHECK(cepe_ctx_set_context(c, NULL, NULL, 0, 1) == CEPE_OK && cepe_ctx_context_length(c) == 0);
    cepe_ctx_reset(c);
    CHECK(cepe_ctx_forward(c, ids, NULL, mask, T, b2, CEPE_LOGITS_ALL) == CEPE_OK);
    CHECK(max_abs_diff(full, b2, (size_t)B * T * V) < 1e-5f); /* detached: the base decoder */

    /* RoPE helpers and the E2-LLM sampler */
    cepe_rope_config rc;
    cepe_rope_config_init(&rc, 10000.0, 8);
    float inv[4], mag = 0.0f;
    CHECK(cepe_rope_frequencies(&rc, 0, inv, &mag) == CEPE_OK && mag == 1.0f && inv[0] == 1.0f);
    rc.type = CEPE_ROPE_LINEAR;
    rc.factor = 0.5;
    CHECK(cepe_rope_check(&rc) == CEPE_ERR_INVALID_ARG);
    double pos[3 * 16];
    int32_t g[3], t_off[3];
    CHECK(cepe_e2llm_positions(16, 8, 4, 3, 1, pos, g, t_off) == CEPE_OK);
    for (int i = 0; i < 3; i++) CHECK(g[i] >= 1 && g[i] <= 4 && pos[i * 16 + 3] == 3.0 / g[i]);
    CHECK(cepe_e2llm_positions(0, 8, 4, 3, 1, pos, g, t_off) == CEPE_ERR_INVALID_ARG);

    cepe_ctx_free(c);
    cepe_model_free(m);
    for (int i = 0; i < n_weights; i++) free(weights[i]);
    free(full), free(step), free(E), free(states), free(a), free(b2);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
