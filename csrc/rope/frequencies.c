/* frequencies.c — per-pair RoPE inverse frequencies w'_j and the magnitude M of
 * every scaling variant, as transformers 5.23's _compute_*_parameters compute
 * them (including their edge rules; see each function). Everything is done in
 * double and stored as float: HF works in float32, so we agree to ~1e-7
 * relative, and with an fp64 reference to float rounding. */
#include <math.h>
#include <string.h>

#include "../common.h"
#include "../model/model.h"
#include "rope.h"

#define ROPE_PI 3.14159265358979323846

/* ------------------------------------------------------------------ names */

static const char *const type_names[] = {"default", "linear", "dynamic", "yarn", "llama3", "longrope"};
static const char *const layout_names[] = {"half", "interleaved"};
#define N_TYPES ((int)(sizeof type_names / sizeof type_names[0]))
#define N_LAYOUTS ((int)(sizeof layout_names / sizeof layout_names[0]))

/* names[i], or "?" for an i out of the table */
static const char *name_of(const char *const *names, int n, int i) {
    return i >= 0 && i < n ? names[i] : "?";
}

/* The index of name in names, or -1. */
static int index_of(const char *const *names, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(name, names[i]) == 0) return i;
    return -1;
}

const char *cepe_rope_type_name(cepe_rope_type t) { return name_of(type_names, N_TYPES, (int)t); }

int cepe_rope_type_parse(const char *name, cepe_rope_type *out) {
    const int i = index_of(type_names, N_TYPES, name);
    if (i < 0) return -1;
    *out = (cepe_rope_type)i;
    return 0;
}

const char *cepe_rope_layout_name(cepe_rope_layout l) { return name_of(layout_names, N_LAYOUTS, (int)l); }

int cepe_rope_layout_parse(const char *name, cepe_rope_layout *out) {
    const int i = index_of(layout_names, N_LAYOUTS, name);
    if (i < 0) return -1;
    *out = (cepe_rope_layout)i;
    return 0;
}

/* ---------------------------------------------------------------- settings */

void cepe_rope_config_init(cepe_rope_config *rc, double theta, int head_dim) {
    memset(rc, 0, sizeof *rc);
    rc->type = CEPE_ROPE_DEFAULT;
    rc->layout = CEPE_ROPE_HALF;
    rc->theta = theta;
    rc->head_dim = head_dim;
    rc->rotary_dim = head_dim;
    rc->factor = NAN;
    rc->low_freq_factor = rc->high_freq_factor = NAN;
    rc->beta_fast = rc->beta_slow = NAN;
    rc->mscale = rc->mscale_all_dim = NAN;
    rc->attention_factor = NAN;
    rc->truncate = 1;
}

int cepe_rope_original_len(const cepe_rope_config *rc) {
    return rc->original_max_pos > 0 ? rc->original_max_pos : rc->max_pos;
}

/* HF reads optional floats with `x or default`, so 0 counts as unset too. */
static int is_unset(double v) { return isnan(v) || v == 0.0; }

/* The factor s: yarn and longrope infer a missing one as max_pos / L (the
 * DeepSeek-V3 / Phi-3 convention); the other variants require it. */
static double scale_factor(const cepe_rope_config *rc) {
    if (!isnan(rc->factor)) return rc->factor;
    if (rc->type != CEPE_ROPE_YARN && rc->type != CEPE_ROPE_LONGROPE) return NAN;
    int L = cepe_rope_original_len(rc);
    return rc->max_pos > 0 && L > 0 ? (double)rc->max_pos / L : NAN;
}

/* YaRN's attention temperature sqrt(1/t) = 0.1 * m * ln s + 1 (1 for s <= 1). */
static double yarn_get_mscale(double s, double m) { return s <= 1.0 ? 1.0 : 0.1 * m * log(s) + 1.0; }

static double magnitude_of(const cepe_rope_config *rc) {
    double s = scale_factor(rc);
    if (rc->type == CEPE_ROPE_YARN) {
        if (!isnan(rc->attention_factor)) return rc->attention_factor;
        if (!is_unset(rc->mscale) && !is_unset(rc->mscale_all_dim))
            return yarn_get_mscale(s, rc->mscale) / yarn_get_mscale(s, rc->mscale_all_dim);
        return yarn_get_mscale(s, 1.0);
    }
    if (rc->type == CEPE_ROPE_LONGROPE) {
        if (!isnan(rc->attention_factor)) return rc->attention_factor;
        return s <= 1.0 ? 1.0 : sqrt(1.0 + log(s) / log((double)cepe_rope_original_len(rc)));
    }
    return 1.0;
}

/* ------------------------------------------------------------- validation */

static cepe_status check_shape(const cepe_rope_config *rc) {
    if ((int)rc->type < 0 || (int)rc->type >= N_TYPES)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.rope_type: unknown value %d", (int)rc->type);
    if ((int)rc->layout < 0 || (int)rc->layout >= N_LAYOUTS)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope layout: unknown value %d (0 = half, 1 = interleaved)",
                         (int)rc->layout);
    if (!(rc->theta > 1.0) || !isfinite(rc->theta))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_theta must be a finite number > 1, got %g", rc->theta);
    if (rc->head_dim < 2 || rc->head_dim % 2)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "head_dim must be an even number >= 2, got %d", rc->head_dim);
    if (rc->rotary_dim < 2 || rc->rotary_dim % 2 || rc->rotary_dim > rc->head_dim)
        return cepe_fail(
            CEPE_ERR_INVALID_ARG,
            "rotary_dim (head_dim * partial_rotary_factor) must be even and in [2, head_dim=%d], "
            "got %d",
            rc->head_dim, rc->rotary_dim);
    if (rc->max_pos < 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "max_position_embeddings must be >= 0, got %d", rc->max_pos);
    return CEPE_OK;
}

static cepe_status check_factor(const cepe_rope_config *rc) {
    const char *name = cepe_rope_type_name(rc->type);
    double s = scale_factor(rc);
    if (isnan(rc->factor) && isnan(s)) {
        if (rc->type == CEPE_ROPE_YARN || rc->type == CEPE_ROPE_LONGROPE)
            return cepe_fail(CEPE_ERR_INVALID_ARG,
                             "rope_scaling.factor is not set for rope_type '%s' and cannot be inferred "
                             "(max_position_embeddings is unknown)",
                             name);
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.factor is required for rope_type '%s'", name);
    }
    if (!isfinite(s) || s < 1.0) {
        if (isnan(rc->factor))
            return cepe_fail(CEPE_ERR_INVALID_ARG,
                             "rope_scaling.factor (implicit: max_position_embeddings / "
                             "original_max_position_embeddings = %d / %d) must be >= 1",
                             rc->max_pos, cepe_rope_original_len(rc));
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.factor must be >= 1, got %g", s);
    }
    return CEPE_OK;
}

static cepe_status check_window(const cepe_rope_config *rc) {
    if (cepe_rope_original_len(rc) < 1)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "rope_scaling.original_max_position_embeddings (or max_position_embeddings) must be "
                         ">= 1 for rope_type '%s', got %d",
                         cepe_rope_type_name(rc->type), cepe_rope_original_len(rc));
    return CEPE_OK;
}

static cepe_status check_optional(const char *key, double v, int positive) {
    if (isnan(v)) return CEPE_OK;
    if (!isfinite(v) || (positive && v <= 0.0))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.%s must be a finite number%s, got %g", key,
                         positive ? " > 0" : "", v);
    return CEPE_OK;
}

static cepe_status check_llama3(const cepe_rope_config *rc) {
    if (isnan(rc->low_freq_factor) || isnan(rc->high_freq_factor))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.%s is required for rope_type 'llama3'",
                         isnan(rc->low_freq_factor) ? "low_freq_factor" : "high_freq_factor");
    cepe_status st = check_optional("low_freq_factor", rc->low_freq_factor, 1);
    if (!st) st = check_optional("high_freq_factor", rc->high_freq_factor, 1);
    if (st) return st;
    if (!(rc->high_freq_factor > rc->low_freq_factor))
        return cepe_fail(
            CEPE_ERR_INVALID_ARG,
            "rope_scaling.high_freq_factor must be > low_freq_factor, got high_freq_factor=%g and "
            "low_freq_factor=%g",
            rc->high_freq_factor, rc->low_freq_factor);
    return CEPE_OK;
}

static cepe_status check_yarn(const cepe_rope_config *rc) {
    /* beta 0 means "default" (HF's `or`); negatives would take log of < 0. */
    if (!isnan(rc->beta_fast) && (rc->beta_fast < 0.0 || !isfinite(rc->beta_fast)))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.beta_fast must be a finite number > 0, got %g",
                         rc->beta_fast);
    if (!isnan(rc->beta_slow) && (rc->beta_slow < 0.0 || !isfinite(rc->beta_slow)))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.beta_slow must be a finite number > 0, got %g",
                         rc->beta_slow);
    double fast = is_unset(rc->beta_fast) ? 32.0 : rc->beta_fast;
    double slow = is_unset(rc->beta_slow) ? 1.0 : rc->beta_slow;
    if (fast < slow)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "rope_scaling.beta_fast must be >= beta_slow, got beta_fast=%g and beta_slow=%g",
                         fast, slow);
    cepe_status st = check_optional("mscale", rc->mscale, 0);
    if (!st) st = check_optional("mscale_all_dim", rc->mscale_all_dim, 0);
    return st;
}

static cepe_status check_longrope(const cepe_rope_config *rc) {
    const float *lists[2] = {rc->short_factor, rc->long_factor};
    const char *keys[2] = {"short_factor", "long_factor"};
    for (int k = 0; k < 2; k++) {
        if (!lists[k])
            return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_scaling.%s is required for rope_type 'longrope'",
                             keys[k]);
        for (int j = 0; j < rc->rotary_dim / 2; j++)
            if (!(lists[k][j] > 0.0f) || !isfinite(lists[k][j]))
                return cepe_fail(CEPE_ERR_INVALID_ARG,
                                 "rope_scaling.%s[%d] must be a finite number > 0, got %g", keys[k], j,
                                 (double)lists[k][j]);
    }
    return CEPE_OK;
}

static cepe_status check_variant(const cepe_rope_config *rc) {
    if (rc->type == CEPE_ROPE_DEFAULT) return CEPE_OK;
    if (rc->type == CEPE_ROPE_DYNAMIC && rc->rotary_dim < 4) /* the NTK exponent is dim / (dim - 2) */
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_type 'dynamic' needs rotary_dim >= 4, got %d",
                         rc->rotary_dim);
    cepe_status st = rc->type == CEPE_ROPE_LINEAR ? CEPE_OK : check_window(rc);
    if (!st) st = check_factor(rc);
    if (st) return st;
    switch (rc->type) {
    case CEPE_ROPE_LLAMA3:
        return check_llama3(rc);
    case CEPE_ROPE_YARN:
        return check_yarn(rc);
    case CEPE_ROPE_LONGROPE:
        return check_longrope(rc);
    default:
        return CEPE_OK;
    }
}

cepe_status cepe_rope_check(const cepe_rope_config *rc) {
    if (!rc) return cepe_fail(CEPE_ERR_INVALID_ARG, "rope config is NULL");
    cepe_status st = check_shape(rc);
    if (!st) st = check_variant(rc);
    if (!st) st = check_optional("attention_factor", rc->attention_factor, 1);
    if (st) return st;
    /* A derived magnitude can still be useless (mscale ratios, L = 1). */
    double m = magnitude_of(rc);
    if (!(m > 0.0) || !isfinite(m))
        return cepe_fail(
            CEPE_ERR_INVALID_ARG,
            "rope_scaling: the settings give an attention factor (magnitude) of %g; it must be a "
            "finite number > 0 (check mscale, mscale_all_dim, original_max_position_embeddings)",
            m);
    return CEPE_OK;
}

/* ------------------------------------------------------------ frequencies */

/* HF's base table: w_j = 1 / base^(2j / dim). */
static double base_freq(double base, int j, int dim) { return 1.0 / pow(base, (2.0 * j) / dim); }

static void freqs_plain(const cepe_rope_config *rc, double divisor, float *out) {
    for (int j = 0; j < rc->rotary_dim / 2; j++)
        out[j] = (float)(base_freq(rc->theta, j, rc->rotary_dim) / divisor);
}

/* Dynamic NTK: base' = base * (s*n/L - (s-1))^(dim/(dim-2)) with
 * n = max(seq_len, L), so short sequences get the plain table. HF's L here is
 * max_position_embeddings (stored in original_max_pos by parse_rope). */
static void freqs_dynamic(const cepe_rope_config *rc, int seq_len, float *out) {
    const int dim = rc->rotary_dim, L = cepe_rope_original_len(rc);
    const double s = rc->factor, n = seq_len > L ? seq_len : L;
    const double base = rc->theta * pow(s * n / L - (s - 1.0), (double)dim / (dim - 2));
    for (int j = 0; j < dim / 2; j++) out[j] = (float)base_freq(base, j, dim);
}

/* YaRN's inverse of "pair index -> rotations over L": the (fractional) pair
 * index that turns `rotations` times over the original window. */
static double yarn_correction_dim(double rotations, int dim, double base, int L) {
    return dim * log(L / (rotations * 2.0 * ROPE_PI)) / (2.0 * log(base));
}

/* YaRN: pairs below `low` keep w_j (extrapolate), above `high` get w_j/s
 * (interpolate), a linear ramp in between. HF clamps high to dim-1 (not
 * dim/2-1) and widens an empty ramp by 0.001. */
static void freqs_yarn(const cepe_rope_config *rc, float *out) {
    const int dim = rc->rotary_dim, L = cepe_rope_original_len(rc);
    const double s = scale_factor(rc);
    double low = yarn_correction_dim(is_unset(rc->beta_fast) ? 32.0 : rc->beta_fast, dim, rc->theta, L);
    double high = yarn_correction_dim(is_unset(rc->beta_slow) ? 1.0 : rc->beta_slow, dim, rc->theta, L);
    if (rc->truncate) {
        low = floor(low);
        high = ceil(high);
    }
    low = fmax(low, 0.0);
    high = fmin(high, dim - 1.0);
    if (low == high) high += 0.001;
    for (int j = 0; j < dim / 2; j++) {
        double ramp = fmin(fmax((j - low) / (high - low), 0.0), 1.0);
        double extrap = 1.0 - ramp; /* weight of the unscaled frequency */
        double w = base_freq(rc->theta, j, dim);
        out[j] = (float)(w / s * (1.0 - extrap) + w * extrap);
    }
}

/* Llama 3.1: by wavelength 2*pi/w_j: shorter than L/high_freq_factor keep w_j,
 * longer than L/low_freq_factor get w_j/s, in between a smooth blend. */
static void freqs_llama3(const cepe_rope_config *rc, float *out) {
    const int dim = rc->rotary_dim;
    const double L = cepe_rope_original_len(rc), s = rc->factor;
    const double lo = rc->low_freq_factor, hi = rc->high_freq_factor;
    const double low_wl = L / lo, high_wl = L / hi;
    for (int j = 0; j < dim / 2; j++) {
        double w = base_freq(rc->theta, j, dim), wl = 2.0 * ROPE_PI / w;
        if (wl > low_wl) {
            w /= s;
        } else if (!(wl < high_wl)) {
            double smooth = (L / wl - lo) / (hi - lo);
            w = (1.0 - smooth) * w / s + smooth * w;
        }
        out[j] = (float)w;
    }
}

/* LongRoPE: w_j / lambda_j with lambda the long factors once seq_len > L,
 * the short ones otherwise (and for seq_len 0, HF's None). */
static void freqs_longrope(const cepe_rope_config *rc, int seq_len, float *out) {
    const int dim = rc->rotary_dim;
    const float *ext = seq_len > cepe_rope_original_len(rc) ? rc->long_factor : rc->short_factor;
    for (int j = 0; j < dim / 2; j++) out[j] = (float)(base_freq(rc->theta, j, dim) / ext[j]);
}

cepe_status cepe_rope_frequencies(const cepe_rope_config *rc, int seq_len, float *inv_freq,
                                  float *magnitude) {
    cepe_status st = cepe_rope_check(rc);
    if (st) return st;
    if (!inv_freq) return cepe_fail(CEPE_ERR_INVALID_ARG, "inv_freq is NULL");
    if (seq_len < 0) return cepe_fail(CEPE_ERR_INVALID_ARG, "seq_len must be >= 0, got %d", seq_len);
    switch (rc->type) {
    case CEPE_ROPE_DEFAULT:
        freqs_plain(rc, 1.0, inv_freq);
        break;
    case CEPE_ROPE_LINEAR:
        freqs_plain(rc, rc->factor, inv_freq);
        break;
    case CEPE_ROPE_DYNAMIC:
        freqs_dynamic(rc, seq_len, inv_freq);
        break;
    case CEPE_ROPE_YARN:
        freqs_yarn(rc, inv_freq);
        break;
    case CEPE_ROPE_LLAMA3:
        freqs_llama3(rc, inv_freq);
        break;
    case CEPE_ROPE_LONGROPE:
        freqs_longrope(rc, seq_len, inv_freq);
        break;
    }
    if (magnitude) *magnitude = (float)magnitude_of(rc);
    return CEPE_OK;
}

/* The decoder's table: the default variant over the whole head. */
cepe_status cepe_rope_setup(const cepe_config *cfg, rope_state *out) {
    memset(out, 0, sizeof *out);
    if (cfg->rope.head_dim == 0)
        cepe_rope_config_init(&out->rc, cfg->rope_theta, cfg->head_dim);
    else
        out->rc = cfg->rope;
    cepe_rope_config *rc = &out->rc;
    if (rc->head_dim != cfg->head_dim)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope: head_dim %d differs from the model's %d", rc->head_dim,
                         cfg->head_dim);
    cepe_status st = cepe_rope_check(rc);
    if (st) return st;
    const int h = rc->rotary_dim / 2;
    out->half = h;
    out->length_dependent = rc->type == CEPE_ROPE_DYNAMIC || rc->type == CEPE_ROPE_LONGROPE;
    out->inv_freq = cepe_calloc((size_t)h, sizeof(float));
    out->factors = cepe_calloc((size_t)h * 2, sizeof(float));
    if (!out->inv_freq || !out->factors) {
        cepe_rope_release(out);
        return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory for RoPE frequencies");
    }
    /* own the factor lists: the caller's arrays may go away after create */
    if (rc->short_factor) memcpy(out->factors, rc->short_factor, sizeof(float) * (size_t)h);
    if (rc->long_factor) memcpy(out->factors + h, rc->long_factor, sizeof(float) * (size_t)h);
    rc->short_factor = rc->short_factor ? out->factors : NULL;
    rc->long_factor = rc->long_factor ? out->factors + h : NULL;
    st = cepe_rope_frequencies(rc, 0, out->inv_freq, &out->mscale);
    if (st) cepe_rope_release(out);
    return st;
}

void cepe_rope_release(rope_state *r) {
    cepe_free(r->inv_freq);
    cepe_free(r->factors);
    r->inv_freq = NULL;
    r->factors = NULL;
}

cepe_status cepe_rope_for_call(const rope_state *r, int seq_len, int *cached_len, float *inv_freq,
                               float *mscale) {
    const int L = cepe_rope_original_len(&r->rc);
    int len = seq_len;
    if (r->rc.type == CEPE_ROPE_DYNAMIC) {
        /* transformers' dynamic_rope_update: grow the table with the longest
         * sequence seen so far; return to the original once a call is short
         * again. Keys already cached keep the rotation they were given. */
        if (seq_len > *cached_len) *cached_len = seq_len;
        if (seq_len < L && *cached_len > L) *cached_len = L;
        len = *cached_len;
    } else if (r->rc.type != CEPE_ROPE_LONGROPE) {
        memcpy(inv_freq, r->inv_freq, sizeof(float) * (size_t)r->half);
        *mscale = r->mscale;
        return CEPE_OK;
    }
    return cepe_rope_frequencies(&r->rc, len, inv_freq, mscale);
}
