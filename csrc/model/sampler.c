/* sampler.c — the sampler chain (its steps and their order are documented
 * in cepe.h, beside cepe_sampling) and the generation loop that feeds each
 * picked token back through the decoder. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../common.h"
#include "model.h"

struct cepe_sampler {
    cepe_sampling p; /* the settings; its arrays point at the copies below */
    int B, V;
    uint64_t rng;
    /* penalties (counts == NULL: off) */
    int window;                /* tokens kept per row; 0: every token accepted counts */
    int32_t *counts;           /* (B, V) occurrences of each token in the row's window */
    int32_t *ring;             /* (B, window) the window, oldest at ring_head */
    int *ring_len, *ring_head; /* (B) */
    /* stop strings (n_stop == 0: off) */
    int max_stop, tail_cap; /* longest stop string; tail bytes kept + the longest token */
    uint8_t *tail;          /* (B, tail_cap) the end of each row's generated text */
    int *tail_len;          /* (B) */
    uint8_t *finished;      /* (B) cepe_finish */
    long *generated;        /* (B) tokens sampled */
    /* one pick's scratch */
    double *z;     /* (V) logits after bias and penalties */
    double *prob;  /* (V) by token id, valid for the candidates */
    double *key;   /* (V) sort key by token id */
    int32_t *cand; /* (V) the tokens still in the running */
    /* owned copies of the settings' arrays */
    int32_t *bias_ids, *eos_ids, *token_offsets, *stop_offsets;
    float *bias;
    uint8_t *token_text, *stop_text;
};

/* ------------------------------------------------------------ random stream */

/* splitmix64: small, seedable, good enough to draw one uniform per token. */
static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double next_uniform(uint64_t *s) { return (double)(next_u64(s) >> 11) * 0x1.0p-53; }

/* ----------------------------------------------------------------- ordering */

/* a ranks before b: a larger key, ties to the lower id. */
static int before(const double *key, int32_t a, int32_t b) {
    return key[a] > key[b] || (key[a] == key[b] && a < b);
}

/* Heap with the last-ranked token at the root. */
static void sift_down(const double *key, int32_t *h, int n, int i) {
    for (;;) {
        int w = i;
        const int l = 2 * i + 1, r = l + 1;
        if (l < n && before(key, h[w], h[l])) w = l;
        if (r < n && before(key, h[w], h[r])) w = r;
        if (w == i) return;
        const int32_t t = h[i];
        h[i] = h[w], h[w] = t;
        i = w;
    }
}

/* Moves the k first-ranked of ids[0..n) (by key) to ids[0..k), in rank
 * order: O(n log k), so top-k of a large vocabulary needs no full sort. */
static void rank_first(const double *key, int32_t *ids, int n, int k) {
    if (k > n) k = n;
    if (k <= 0) return;
    for (int i = k / 2 - 1; i >= 0; i--) sift_down(key, ids, k, i);
    for (int i = k; i < n; i++)
        if (before(key, ids[i], ids[0])) {
            ids[0] = ids[i];
            sift_down(key, ids, k, 0);
        }
    for (int m = k - 1; m > 0; m--) {
        const int32_t t = ids[0];
        ids[0] = ids[m], ids[m] = t;
        sift_down(key, ids, m, 0);
    }
}

/* Ranks ids[0..n) by key far enough that the first m hold probability mass
 * >= target, with m as small as can be; returns m (n if none reach it).
 * Ranking grows 64, 256, ... tokens at a time: the nucleus of a peaked
 * distribution costs a top-k, not a sort of the vocabulary. */
static int rank_until_mass(const double *key, const double *prob, int32_t *ids, int n, double target) {
    for (int k = 64;; k = k > n / 4 ? n : 4 * k) {
        rank_first(key, ids, n, k < n ? k : n);
        double cum = 0.0;
        for (int i = 0; i < k && i < n; i++) {
            cum += prob[ids[i]];
            if (cum >= target) return i + 1;
        }
        if (k >= n) return n;
    }
}

/* prob[id] = softmax(z * inv_t) over cand[0..n). */
static void softmax_cand(const double *z, const int32_t *cand, int n, double inv_t, double *prob) {
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++)
        if (z[cand[i]] > mx) mx = z[cand[i]];
    for (int i = 0; i < n; i++) sum += prob[cand[i]] = exp((z[cand[i]] - mx) * inv_t);
    for (int i = 0; i < n; i++) prob[cand[i]] /= sum;
}

/* ------------------------------------------------------------- the chain */

/* Step 2 for one token seen `count` times (a banned token stays banned). */
static void penalize(double *zi, int32_t count, const cepe_sampling *p) {
    if (!(*zi > -INFINITY)) return;
    *zi = *zi <= 0.0 ? *zi * (double)p->repeat_penalty : *zi / (double)p->repeat_penalty;
    *zi -= (double)count * (double)p->frequency_penalty + (double)p->presence_penalty;
}

/* Steps 1-2 (bias, penalties) into s->z; s->cand gets every token not
 * banned; returns their number. */
static int adjusted_logits(cepe_sampler *s, int row, const float *logits) {
    const cepe_sampling *p = &s->p;
    const int V = s->V;
    double *z = s->z;
    for (int i = 0; i < V; i++) z[i] = logits[i];
    for (int j = 0; j < p->n_bias; j++) z[p->bias_ids[j]] += p->bias[j];
    if (s->counts) {
        int32_t *c = s->counts + (size_t)row * V;
        if (s->window > 0) { /* each distinct token of the ring once: its count is negated once applied */
            const int32_t *ring = s->ring + (size_t)row * s->window;
            const int n = s->ring_len[row];
            for (int i = 0; i < n; i++) {
                const int32_t t = ring[i];
                if (c[t] > 0) {
                    penalize(&z[t], c[t], p);
                    c[t] = -c[t];
                }
            }
            for (int i = 0; i < n; i++)
                if (c[ring[i]] < 0) c[ring[i]] = -c[ring[i]];
        } else {
            for (int i = 0; i < V; i++)
                if (c[i] > 0) penalize(&z[i], c[i], p);
        }
    }
    int n = 0;
    for (int i = 0; i < V; i++)
        if (z[i] > -INFINITY) s->cand[n++] = i;
    return n;
}

/* Steps 3-6 over s->cand[0..n); returns how many are left, first-ranked by z
 * when *sorted. */
static int filter(cepe_sampler *s, int n, int *sorted) {
    const cepe_sampling *p = &s->p;
    const double *z = s->z;
    int32_t *cand = s->cand;
    double *prob = s->prob;
    *sorted = 0;
    if (p->top_k > 0 && p->top_k < n) {
        rank_first(z, cand, n, p->top_k);
        n = p->top_k;
        *sorted = 1;
    }
    if (p->typical_p < 1.0f && n > 1) {
        softmax_cand(z, cand, n, 1.0, prob);
        double H = 0.0;
        for (int i = 0; i < n; i++)
            if (prob[cand[i]] > 0.0) H -= prob[cand[i]] * log(prob[cand[i]]);
        for (int i = 0; i < n; i++) /* most typical first: |-log p - H| ascending */
            s->key[cand[i]] = prob[cand[i]] > 0.0 ? -fabs(-log(prob[cand[i]]) - H) : -INFINITY;
        n = rank_until_mass(s->key, prob, cand, n, p->typical_p);
        *sorted = 0;
    }
    if (p->top_p < 1.0f && n > 1) {
        softmax_cand(z, cand, n, 1.0, prob);
        if (*sorted) { /* by top-k */
            double cum = 0.0;
            for (int i = 0; i < n; i++)
                if ((cum += prob[cand[i]]) >= p->top_p) {
                    n = i + 1;
                    break;
                }
        } else {
            /* Only tokens that could be in the nucleus need ranking (llama2.c's
             * trick): those below (1 - top_p) / (n - 1) together hold less than
             * 1 - top_p, so each is past the shortest prefix holding top_p. */
            const double cutoff = (1.0 - p->top_p) / (double)(n - 1);
            int m = 0;
            for (int i = 0; i < n; i++)
                if (prob[cand[i]] >= cutoff) cand[m++] = cand[i];
            /* the most likely token always stays: its p >= 1/n > cutoff */
            n = rank_until_mass(z, prob, cand, m, p->top_p);
            *sorted = 1;
        }
    }
    if (p->min_p > 0.0f && n > 1) {
        double mx = -INFINITY;
        for (int i = 0; i < n; i++)
            if (z[cand[i]] > mx) mx = z[cand[i]];
        const double floor_z = mx + log((double)p->min_p); /* p >= min_p * max p */
        int m = 0;
        for (int i = 0; i < n; i++)
            if (z[cand[i]] >= floor_z) cand[m++] = cand[i];
        n = m; /* order kept */
    }
    return n;
}

/* The first-ranked candidate by z. */
static int32_t best_cand(const double *z, const int32_t *cand, int n, int sorted) {
    if (sorted) return cand[0];
    int32_t b = cand[0];
    for (int i = 1; i < n; i++)
        if (before(z, cand[i], b)) b = cand[i];
    return b;
}

/* The whole chain: the chosen token, or -1 with the error set. probs, if not
 * NULL, receives the final distribution instead of a draw. */
static int32_t run_chain(cepe_sampler *s, int row, const float *logits, float *probs) {
    const cepe_sampling *p = &s->p;
    int n = adjusted_logits(s, row, logits);
    if (n == 0) {
        cepe_fail(CEPE_ERR_INVALID_ARG,
                  "logit_bias and the penalties leave no token to pick (every logit is -inf)");
        return -1;
    }
    int sorted = 0;
    if (p->temperature > 0.0f ||
        p->typical_p < 1.0f) /* greedy: the filters other than typical-p keep the best */
        n = filter(s, n, &sorted);
    if (p->temperature == 0.0f) {
        const int32_t tok = best_cand(s->z, s->cand, n, sorted);
        if (probs) {
            memset(probs, 0, sizeof(float) * (size_t)s->V);
            probs[tok] = 1.0f;
        }
        return tok;
    }
    softmax_cand(s->z, s->cand, n, 1.0 / (double)p->temperature, s->prob);
    if (probs) {
        memset(probs, 0, sizeof(float) * (size_t)s->V);
        for (int i = 0; i < n; i++) probs[s->cand[i]] = (float)s->prob[s->cand[i]];
        return s->cand[0];
    }
    const double r = next_uniform(&s->rng);
    double acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += s->prob[s->cand[i]];
        if (r < acc) return s->cand[i];
    }
    return s->cand[n - 1]; /* r within rounding of 1 */
}

/* lp's fields from the raw logits' log-softmax; s->cand and s->key as scratch. */
static void raw_logprobs(cepe_sampler *s, const float *logits, int32_t tok, const cepe_logprobs *lp) {
    const int V = s->V;
    double mx = -INFINITY, sum = 0.0;
    for (int i = 0; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    for (int i = 0; i < V; i++) sum += exp((double)logits[i] - mx);
    const double lse = mx + log(sum);
    if (lp->logprob) *lp->logprob = (float)((double)logits[tok] - lse);
    if (lp->n_top > 0 && (lp->top_ids || lp->top_logprobs)) {
        for (int i = 0; i < V; i++) s->key[i] = logits[i], s->cand[i] = i;
        rank_first(s->key, s->cand, V, lp->n_top);
        for (int j = 0; j < lp->n_top; j++) {
            if (lp->top_ids) lp->top_ids[j] = s->cand[j];
            if (lp->top_logprobs) lp->top_logprobs[j] = (float)((double)logits[s->cand[j]] - lse);
        }
    }
}

/* ------------------------------------------------------- accepting tokens */

static void accept_window(cepe_sampler *s, int row, int32_t tok) {
    if (!s->counts) return;
    int32_t *c = s->counts + (size_t)row * s->V;
    c[tok]++;
    if (s->window <= 0) return;
    int32_t *ring = s->ring + (size_t)row * s->window;
    if (s->ring_len[row] == s->window) { /* full: the oldest leaves */
        const int h = s->ring_head[row];
        c[ring[h]]--;
        ring[h] = tok;
        s->ring_head[row] = (h + 1) % s->window;
    } else {
        ring[(s->ring_head[row] + s->ring_len[row]) % s->window] = tok;
        s->ring_len[row]++;
    }
}

/* Whether row's text, with tok's bytes added, now holds a stop string. */
static int accept_text(cepe_sampler *s, int row, int32_t tok) {
    if (s->p.n_stop == 0) return 0;
    uint8_t *buf = s->tail + (size_t)row * s->tail_cap;
    const int32_t *off = s->p.token_offsets;
    const int tl = off[tok + 1] - off[tok];
    int len = s->tail_len[row];
    memcpy(buf + len, s->p.token_text + off[tok], (size_t)tl);
    len += tl;
    int hit = 0;
    for (int j = 0; j < s->p.n_stop && !hit; j++) {
        const uint8_t *st = s->p.stop_text + s->p.stop_offsets[j];
        const int sl = s->p.stop_offsets[j + 1] - s->p.stop_offsets[j];
        for (int at = 0; at + sl <= len && !hit; at++) hit = memcmp(buf + at, st, (size_t)sl) == 0;
    }
    const int keep = len < s->max_stop - 1 ? len : s->max_stop - 1;
    memmove(buf, buf + len - keep, (size_t)keep);
    s->tail_len[row] = keep;
    return hit;
}

static void accept_generated(cepe_sampler *s, int row, int32_t tok) {
    s->generated[row]++;
    accept_window(s, row, tok);
    for (int e = 0; e < s->p.n_eos; e++)
        if (tok == s->p.eos_ids[e]) s->finished[row] = CEPE_FINISH_EOS;
    if (accept_text(s, row, tok) && !s->finished[row]) s->finished[row] = CEPE_FINISH_STOP;
}

/* ---------------------------------------------------------- the public API */

static int finite_row(const float *logits, int V) {
    float acc = 0.0f;
    for (int i = 0; i < V; i++) acc += logits[i] * 0.0f; /* NaN or inf anywhere makes it NaN */
    return acc == 0.0f;
}

static cepe_status check_settings(const cepe_sampling *p, int V) {
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "temperature must be a finite number >= 0, got %g",
                         (double)p->temperature);
    if (p->top_k < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "top_k must be >= 0, got %d", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "top_p must be in (0, 1], got %g", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "min_p must be in [0, 1], got %g", (double)p->min_p);
    if (!(p->typical_p > 0.0f && p->typical_p <= 1.0f))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "typical_p must be in (0, 1], got %g", (double)p->typical_p);
    if (!(p->repeat_penalty > 0.0f) || !isfinite(p->repeat_penalty))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "repeat_penalty must be a finite number > 0, got %g",
                         (double)p->repeat_penalty);
    if (!isfinite(p->frequency_penalty))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "frequency_penalty must be finite, got %g",
                         (double)p->frequency_penalty);
    if (!isfinite(p->presence_penalty))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "presence_penalty must be finite, got %g",
                         (double)p->presence_penalty);
    if (p->repeat_last_n < -1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "repeat_last_n must be >= -1, got %d", p->repeat_last_n);
    if (p->n_bias < 0 || (p->n_bias > 0 && (!p->bias_ids || !p->bias)))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_sampler_create: bad logit bias list");
    for (int j = 0; j < p->n_bias; j++) {
        if (p->bias_ids[j] < 0 || p->bias_ids[j] >= V)
            return cepe_fail(CEPE_ERR_INVALID_ARG, "logit_bias token %d is out of range [0, %d)",
                             p->bias_ids[j], V);
        if (isnan(p->bias[j]) || p->bias[j] == INFINITY)
            return cepe_fail(CEPE_ERR_INVALID_ARG, "logit_bias of token %d must be finite or -inf, got %g",
                             p->bias_ids[j], (double)p->bias[j]);
    }
    if (p->n_eos < 0 || (p->n_eos > 0 && !p->eos_ids))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_sampler_create: bad eos list");
    if (p->pad_token_id < 0 || p->pad_token_id >= V)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "pad_token_id %d is out of range [0, %d)", p->pad_token_id, V);
    if (p->n_stop < 0 ||
        (p->n_stop > 0 && (!p->stop_text || !p->stop_offsets || !p->token_text || !p->token_offsets)))
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "cepe_sampler_create: stop strings need their text and the tokens'");
    for (int j = 0; j < p->n_stop; j++)
        if (p->stop_offsets[j + 1] <= p->stop_offsets[j] || p->stop_offsets[0] != 0)
            return cepe_fail(CEPE_ERR_INVALID_ARG, "stop string %d is empty or its offsets decrease", j);
    if (p->n_stop > 0) {
        if (p->token_offsets[0] != 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "token_offsets must start at 0");
        for (int i = 0; i < V; i++)
            if (p->token_offsets[i + 1] < p->token_offsets[i])
                return cepe_fail(CEPE_ERR_INVALID_ARG, "token_offsets decrease at token %d", i);
    }
    return CEPE_OK;
}

/* A copy of n elements of `size` bytes (NULL for none), or -1 out of memory. */
static int copy_array(void **dst, const void *src, size_t n, size_t size) {
    *dst = NULL;
    if (n == 0 || !src) return 0;
    *dst = cepe_calloc(n, size);
    if (!*dst) return -1;
    memcpy(*dst, src, n * size);
    return 0;
}

cepe_status cepe_sampler_create(const cepe_sampling *p, int batch, int V, cepe_sampler **out) {
    if (!p || !out) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_sampler_create: NULL argument");
    *out = NULL;
    if (batch < 1) return cepe_fail(CEPE_ERR_INVALID_ARG, "batch size must be >= 1, got %d", batch);
    if (V < 1) return cepe_fail(CEPE_ERR_INVALID_ARG, "vocab_size must be >= 1, got %d", V);
    cepe_status st = check_settings(p, V);
    if (st) return st;
    cepe_sampler *s = cepe_calloc(1, sizeof *s);
    if (!s) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory creating a sampler");
    s->p = *p;
    s->B = batch, s->V = V;
    s->rng = p->seed;
    const size_t B = (size_t)batch, nv = (size_t)V;
    if (copy_array((void **)&s->bias_ids, p->bias_ids, (size_t)p->n_bias, sizeof(int32_t)) ||
        copy_array((void **)&s->bias, p->bias, (size_t)p->n_bias, sizeof(float)) ||
        copy_array((void **)&s->eos_ids, p->eos_ids, (size_t)p->n_eos, sizeof(int32_t)))
        goto oom;
    s->p.bias_ids = s->bias_ids, s->p.bias = s->bias, s->p.eos_ids = s->eos_ids;
    if (p->n_stop > 0) {
        const size_t n_stop = (size_t)p->n_stop;
        if (copy_array((void **)&s->stop_offsets, p->stop_offsets, n_stop + 1, sizeof(int32_t)) ||
            copy_array((void **)&s->stop_text, p->stop_text, (size_t)p->stop_offsets[n_stop], 1) ||
            copy_array((void **)&s->token_offsets, p->token_offsets, nv + 1, sizeof(int32_t)) ||
            copy_array((void **)&s->token_text, p->token_text, (size_t)p->token_offsets[V], 1))
            goto oom;
        s->p.stop_offsets = s->stop_offsets, s->p.stop_text = s->stop_text;
        s->p.token_offsets = s->token_offsets, s->p.token_text = s->token_text;
        int max_tok = 0;
        for (int j = 0; j < p->n_stop; j++)
            if (p->stop_offsets[j + 1] - p->stop_offsets[j] > s->max_stop)
                s->max_stop = p->stop_offsets[j + 1] - p->stop_offsets[j];
        for (int i = 0; i < V; i++)
            if (p->token_offsets[i + 1] - p->token_offsets[i] > max_tok)
                max_tok = p->token_offsets[i + 1] - p->token_offsets[i];
        s->tail_cap = s->max_stop - 1 + max_tok;
        if (!(s->tail = cepe_calloc(cepe_mul_size(B, (size_t)s->tail_cap + 1), 1))) goto oom;
        if (!(s->tail_len = cepe_calloc(B, sizeof(int)))) goto oom;
    } else {
        s->p.stop_offsets = NULL, s->p.stop_text = NULL, s->p.token_offsets = NULL, s->p.token_text = NULL;
    }
    const int penalized =
        p->repeat_last_n != 0 &&
        (p->repeat_penalty != 1.0f || p->frequency_penalty != 0.0f || p->presence_penalty != 0.0f);
    if (penalized) {
        s->window = p->repeat_last_n > 0 ? p->repeat_last_n : 0;
        if (!(s->counts = cepe_calloc(cepe_mul_size(B, nv), sizeof(int32_t)))) goto oom;
        if (s->window > 0) {
            if (!(s->ring = cepe_calloc(cepe_mul_size(B, (size_t)s->window), sizeof(int32_t)))) goto oom;
            if (!(s->ring_len = cepe_calloc(B, sizeof(int))) || !(s->ring_head = cepe_calloc(B, sizeof(int))))
                goto oom;
        }
    }
    if (!(s->finished = cepe_calloc(B, 1)) || !(s->generated = cepe_calloc(B, sizeof(long))) ||
        !(s->z = cepe_calloc(nv, sizeof(double))) || !(s->prob = cepe_calloc(nv, sizeof(double))) ||
        !(s->key = cepe_calloc(nv, sizeof(double))) || !(s->cand = cepe_calloc(nv, sizeof(int32_t))))
        goto oom;
    *out = s;
    return CEPE_OK;
oom:
    cepe_sampler_free(s);
    return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory creating a sampler for %d rows of %d tokens",
                     batch, V);
}

void cepe_sampler_free(cepe_sampler *s) {
    if (!s) return;
    void *owned[] = {s->counts,     s->ring,          s->ring_len,  s->ring_head,   s->tail,
                     s->tail_len,   s->finished,      s->generated, s->z,           s->prob,
                     s->key,        s->cand,          s->bias_ids,  s->eos_ids,     s->bias,
                     s->token_text, s->token_offsets, s->stop_text, s->stop_offsets};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) cepe_free(owned[i]);
    cepe_free(s);
}

cepe_status cepe_sampler_accept(cepe_sampler *s, const int32_t *ids, const uint8_t *mask, int T) {
    if (!s || (!ids && T > 0)) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_sampler_accept: NULL argument");
    if (T < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_sampler_accept: T must be >= 0, got %d", T);
    const size_t n = (size_t)s->B * (size_t)T;
    for (size_t i = 0; i < n; i++)
        if ((!mask || mask[i]) && (ids[i] < 0 || ids[i] >= s->V))
            return cepe_fail(CEPE_ERR_INVALID_ARG, "token id %d is out of range [0, %d)", ids[i], s->V);
    for (int b = 0; b < s->B; b++)
        for (int t = 0; t < T; t++) {
            const size_t i = (size_t)b * (size_t)T + (size_t)t;
            if (!mask || mask[i]) accept_window(s, b, ids[i]);
        }
    return CEPE_OK;
}

static cepe_status check_row(const cepe_sampler *s, int row, const float *logits) {
    if (!s || !logits) return cepe_fail(CEPE_ERR_INVALID_ARG, "sampler: NULL argument");
    if (row < 0 || row >= s->B)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "row %d is out of range [0, %d)", row, s->B);
    if (!finite_row(logits, s->V)) return cepe_fail(CEPE_ERR_INVALID_ARG, "the logits are not all finite");
    return CEPE_OK;
}

cepe_status cepe_sampler_distribution(cepe_sampler *s, int row, const float *logits, float *probs) {
    cepe_status st = check_row(s, row, logits);
    if (st) return st;
    if (!probs) return cepe_fail(CEPE_ERR_INVALID_ARG, "sampler: NULL argument");
    return run_chain(s, row, logits, probs) < 0 ? CEPE_ERR_INVALID_ARG : CEPE_OK;
}

/* One pick of row from finite logits: the token, its log-probabilities, accepted. */
static cepe_status pick(cepe_sampler *s, int row, const float *logits, int32_t *token,
                        const cepe_logprobs *lp) {
    const int32_t tok = run_chain(s, row, logits, NULL);
    if (tok < 0) return CEPE_ERR_INVALID_ARG;
    if (lp) raw_logprobs(s, logits, tok, lp);
    accept_generated(s, row, tok);
    *token = tok;
    return CEPE_OK;
}

static cepe_status check_logprobs(const cepe_sampler *s, const cepe_logprobs *lp) {
    if (lp && (lp->n_top < 0 || lp->n_top > s->V))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "top_logprobs must be in [0, %d], got %d", s->V, lp->n_top);
    return CEPE_OK;
}

cepe_status cepe_sampler_sample(cepe_sampler *s, int row, const float *logits, int32_t *token,
                                const cepe_logprobs *lp) {
    cepe_status st = check_row(s, row, logits);
    if (st || (st = check_logprobs(s, lp))) return st;
    if (!token) return cepe_fail(CEPE_ERR_INVALID_ARG, "sampler: NULL argument");
    return pick(s, row, logits, token, lp);
}

int cepe_sampler_finished(const cepe_sampler *s, int row) {
    return s && row >= 0 && row < s->B ? s->finished[row] : CEPE_FINISH_NONE;
}

long cepe_sampler_generated(const cepe_sampler *s, int row) {
    return s && row >= 0 && row < s->B ? s->generated[row] : 0;
}

/* ------------------------------------------------------- generation loop */

cepe_status cepe_ctx_generate(cepe_ctx *x, cepe_sampler *s, int max_new, int32_t *out, int *n_out,
                              const cepe_logprobs *lp) {
    if (!x || !s || !out || !n_out)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "cepe_ctx_generate: NULL argument");
    *n_out = 0;
    if (max_new < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "max_new_tokens must be >= 0, got %d", max_new);
    const int V = x->m->cfg.vocab_size, B = x->B;
    if (s->B != B || s->V != V)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "the sampler is for %d rows of a %d-token vocabulary, the context has %d rows of %d",
                         s->B, s->V, B, V);
    cepe_status st = check_logprobs(s, lp);
    if (st) return st;
    if (!x->has_logits)
        return cepe_fail(CEPE_ERR_STATE, "generate needs a prompt: run a forward pass on this context first");
    if (max_new > x->cap - x->len + 1)
        return cepe_fail(CEPE_ERR_STATE, "context capacity exceeded: %d cached + %d new tokens > capacity %d",
                         x->len, max_new - 1, x->cap);
    int running = 0;
    for (int b = 0; b < B; b++) running |= !s->finished[b];
    if (!running || max_new == 0) return CEPE_OK;

    const int n_top = lp ? lp->n_top : 0;
    atomic_store(&x->interrupt, 0);
    for (int step = 0; step < max_new; step++) {
        int all_done = 1;
        for (int b = 0; b < B; b++) {
            const size_t at = (size_t)b * (size_t)max_new + (size_t)step;
            cepe_logprobs row_lp = {0};
            if (lp)
                row_lp = (cepe_logprobs){lp->logprob ? lp->logprob + at : NULL, n_top,
                                         lp->top_ids ? lp->top_ids + at * (size_t)n_top : NULL,
                                         lp->top_logprobs ? lp->top_logprobs + at * (size_t)n_top : NULL};
            int32_t tok = s->p.pad_token_id;
            if (!s->finished[b]) {
                const float *lg = x->last_logits_h + (size_t)b * V;
                if (!finite_row(lg, V))
                    return cepe_fail(
                        CEPE_ERR_NUMERIC,
                        "the logits of row %d are not finite at new token %d: the forward overflowed "
                        "float32 (inputs, context states or weights too large)",
                        b, step);
                if ((st = pick(s, b, lg, &tok, lp ? &row_lp : NULL))) return st;
            } else if (lp) {
                if (row_lp.logprob) *row_lp.logprob = NAN;
                for (int j = 0; j < n_top; j++) {
                    if (row_lp.top_ids) row_lp.top_ids[j] = -1;
                    if (row_lp.top_logprobs) row_lp.top_logprobs[j] = NAN;
                }
            }
            all_done &= s->finished[b] != 0;
            out[at] = tok;
            x->step_ids[b] = tok;
        }
        *n_out = step + 1;
        if (all_done || step + 1 == max_new) {
            x->has_logits = 0; /* the last token is not in the cache: no stale logits */
            break;
        }
        st = cepe_ctx_forward_continue(x, x->step_ids, NULL, NULL, 1, NULL, CEPE_LOGITS_NONE);
        if (st) return st; /* CEPE_ERR_INTERRUPTED included: checked between layers */
    }
    return CEPE_OK;
}
