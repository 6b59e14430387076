/* sampler.c — picking the next token (greedy, temperature, top-k, top-p) and
 * the generation loop that feeds it back through the decoder. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../common.h"
#include "model.h"

/* splitmix64: small, seedable, good enough to draw one uniform per token. */
static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double next_uniform(uint64_t *s) { return (double)(next_u64(s) >> 11) * 0x1.0p-53; }

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best]) best = i; /* first maximum, as torch.argmax */
    return best;
}

/* Sorting candidates by probability, highest first; ties by id. qsort has no
 * context argument, so the table is thread-local (contexts of one model may
 * sample on several threads at once). */
static _Thread_local const float *sort_probs;
static int by_prob_desc(const void *a, const void *b) {
    const int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (sort_probs[i] != sort_probs[j]) return sort_probs[i] < sort_probs[j] ? 1 : -1;
    return i < j ? -1 : i > j;
}

/* Whether every logit of a row is finite: a forward that overflowed float32
 * leaves NaN there, from which greedy or sampled picks would be arbitrary. */
static int logits_finite(const float *logits, int V) {
    float acc = 0.0f;
    for (int i = 0; i < V; i++) acc += logits[i] * 0.0f; /* NaN or inf anywhere makes it NaN */
    return acc == 0.0f;
}

/* Samples from logits (V) with temperature > 0 and optional top-k / top-p. */
static int sample(const float *logits, int V, const cepe_sampling *s, float *probs, int32_t *cand,
                  uint64_t *rng) {
    const int mx = argmax(logits, V);
    const float inv_t = 1.0f / s->temperature;
    if (!(inv_t < INFINITY) || !isfinite(logits[mx])) return mx; /* T -> 0 is greedy; NaN/Inf logits too */
    double sum = 0.0;
    for (int i = 0; i < V; i++) {
        probs[i] = expf((logits[i] - logits[mx]) * inv_t);
        sum += probs[i];
    }
    if (!(sum >= 1.0 && sum < INFINITY)) return mx; /* a NaN logit: nothing sensible to sample */
    for (int i = 0; i < V; i++) probs[i] = (float)(probs[i] / sum);

    int n = V;
    for (int i = 0; i < V; i++) cand[i] = i;
    if (s->top_k > 0 || s->top_p < 1.0f) {
        /* Only tokens that could survive a top-p cut need sorting (llama2.c's
         * trick): anything below (1 - p) / (V - 1) can never be in the nucleus. */
        if (s->top_k <= 0 && V > 1) {
            const float cutoff = (1.0f - s->top_p) / (float)(V - 1);
            n = 0;
            for (int i = 0; i < V; i++)
                if (probs[i] >= cutoff) cand[n++] = i;
            if (n == 0) cand[n++] = mx;
        }
        sort_probs = probs;
        qsort(cand, (size_t)n, sizeof(int32_t), by_prob_desc);
        if (s->top_k > 0 && s->top_k < n) n = s->top_k;
        if (s->top_p < 1.0f) { /* the nucleus of what top-k kept, renormalised (as transformers) */
            double kept = 1.0, cum = 0.0;
            if (s->top_k > 0)
                for (int i = 0, k = 0; i < n; i++, k++) kept = (k ? kept : 0.0) + probs[cand[i]];
            int keep = 0;
            while (keep < n) {
                cum += probs[cand[keep++]];
                if (cum >= s->top_p * kept) break;
            }
            n = keep;
        }
    }
    double total = 0.0;
    for (int i = 0; i < n; i++) total += probs[cand[i]];
    const double r = next_uniform(rng) * total;
    double acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += probs[cand[i]];
        if (r < acc) return cand[i];
    }
    return cand[n - 1];
}

cepe_status cepe_ctx_generate(cepe_ctx *x, const cepe_sampling *s, int max_new, int32_t *out,
                              int *n_out) {
    if (!x || !s || !out || !n_out) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_generate: NULL argument");
    *n_out = 0;
    if (max_new < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "max_new_tokens must be >= 0, got %d", max_new);
    if (!x->has_logits)
        return cepe_fail(CEPE_ERR_STATE, "generate needs a prompt: run a forward pass on this context first");
    if (!(s->temperature >= 0.0f) || !isfinite(s->temperature))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "temperature must be a finite number >= 0, got %g", (double)s->temperature);
    if (!(s->top_p > 0.0f && s->top_p <= 1.0f))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "top_p must be in (0, 1], got %g", (double)s->top_p);
    if (s->n_eos < 0 || (s->n_eos > 0 && !s->eos_ids))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_generate: bad eos list");
    if (s->top_k < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "top_k must be >= 0, got %d", s->top_k);
    const int V = x->m->cfg.vocab_size, B = x->B;
    if (s->pad_token_id < 0 || s->pad_token_id >= V)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "pad_token_id %d is out of range [0, %d)", s->pad_token_id, V);
    if (max_new > x->cap - x->len + 1)
        return cepe_fail(CEPE_ERR_STATE, "context capacity exceeded: %d cached + %d new tokens > capacity %d",
                         x->len, max_new - 1, x->cap);

    uint64_t rng = s->seed;
    memset(x->finished, 0, (size_t)B);
    atomic_store(&x->interrupt, 0);
    for (int step = 0; step < max_new; step++) {
        int all_done = 1;
        for (int b = 0; b < B; b++) {
            int tok = s->pad_token_id;
            if (!x->finished[b]) {
                const float *lg = x->last_logits_h + (long)b * V;
                if (!logits_finite(lg, V))
                    return cepe_fail(CEPE_ERR_NUMERIC,
                                     "the logits of row %d are not finite at new token %d: the forward overflowed "
                                     "float32 (inputs, context states or weights too large)",
                                     b, step);
                tok = s->temperature == 0.0f ? argmax(lg, V) : sample(lg, V, s, x->probs, x->cand, &rng);
                for (int e = 0; e < s->n_eos; e++)
                    if (tok == s->eos_ids[e]) x->finished[b] = 1;
            }
            all_done &= x->finished[b];
            out[(long)b * max_new + step] = tok;
            x->step_ids[b] = tok;
        }
        *n_out = step + 1;
        if (all_done || step + 1 == max_new) {
            x->has_logits = 0; /* the last token is not in the cache: no stale logits */
            break;
        }
        cepe_status st = cepe_ctx_forward_continue(x, x->step_ids, NULL, NULL, 1, NULL, CEPE_LOGITS_NONE);
        if (st) return st; /* CEPE_ERR_INTERRUPTED included: checked between layers */
    }
    return CEPE_OK;
}
