/* e2llm.c — E2-LLM training positions (Liu et al., arXiv:2401.06951, §4.1-4.2,
 * Alg. 1): a window of R tokens is made to look like part of a g*L window by
 * shifting every non-sink position by t and interpolating by g. Pure C (the
 * training loop calls it), deterministic per seed. */
#include <stdint.h>

#include "../common.h"
#include "rope.h"

#define E2LLM_SINKS 4 /* the first tokens keep offset 0 (attention sinks) */

/* xoshiro256** (Blackman & Vigna), seeded through splitmix64 so that nearby
 * seeds give unrelated streams and the state is never all zero. */
typedef struct {
    uint64_t s[4];
} rng_t;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static void rng_seed(rng_t *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}

static uint64_t rng_next(rng_t *r) {
    uint64_t *s = r->s;
    const uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

/* Uniform on [0, n), n >= 1, without modulo bias: the 2^64 mod n smallest
 * outputs are rejected so every residue has the same number of preimages. */
static uint64_t rng_below(rng_t *r, uint64_t n) {
    const uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t x = rng_next(r);
        if (x >= threshold) return x % n;
    }
}

cepe_status cepe_e2llm_check(int R, int L, int g_max, int n_samples) {
    if (R < 1) return cepe_fail(CEPE_ERR_INVALID_ARG, "e2llm: R (training window) must be >= 1, got %d", R);
    if (L < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "e2llm: L (base context window) must be >= 1, got %d", L);
    if (g_max < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "e2llm: g_max (largest scale) must be >= 1, got %d", g_max);
    if (n_samples < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "e2llm: n_samples must be >= 1, got %d", n_samples);
    if ((int64_t)g_max * L > INT32_MAX)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "e2llm: g_max * L = %lld does not fit in int32 (offsets are int32)",
                         (long long)g_max * L);
    return CEPE_OK;
}

/* One window: m for the sinks, m + t after them, all divided by g. */
static void fill_window(double *row, int R, int64_t g, int64_t t) {
    for (int m = 0; m < R; m++) row[m] = (double)(m < E2LLM_SINKS ? m : m + t) / (double)g;
}

cepe_status cepe_e2llm_positions(int R, int L, int g_max, int n_samples, uint64_t seed, double *positions,
                                 int32_t *scales, int32_t *offsets) {
    cepe_status st = cepe_e2llm_check(R, L, g_max, n_samples);
    if (st) return st;
    if (!positions) return cepe_fail(CEPE_ERR_INVALID_ARG, "e2llm: positions is NULL");
    rng_t rng;
    rng_seed(&rng, seed);
    for (int i = 0; i < n_samples; i++) {
        const int64_t g = 1 + (int64_t)rng_below(&rng, (uint64_t)g_max);
        /* g*L < R (e.g. g = 1 with R > L) has no room to shift: t = 0, as the
         * paper leaves it open. */
        const int64_t t_max = g * L > R ? g * L - R : 0;
        const int64_t t = (int64_t)rng_below(&rng, (uint64_t)t_max + 1);
        fill_window(positions + (size_t)i * (size_t)R, R, g, t);
        if (scales) scales[i] = (int32_t)g;
        if (offsets) offsets[i] = (int32_t)t;
    }
    return CEPE_OK;
}
