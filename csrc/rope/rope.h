/* rope.h — RoPE in one folder: the frequency code (frequencies.c), the E2-LLM
 * sampler (e2llm.c) and the op that applies the rotation (apply.c, declared
 * in ops/ops.h with every op). These are the internals shared with the
 * CPython bindings. The public part (the
 * cepe_rope_config struct, cepe_rope_frequencies, cepe_e2llm_positions) is in
 * cepe.h. */
#ifndef CEPE_ROPE_H
#define CEPE_ROPE_H

#include "../cepe.h"

/* "default", "linear", "dynamic", "yarn", "llama3", "longrope" (HF's rope_type). */
const char *cepe_rope_type_name(cepe_rope_type t);
/* 0 and *out set if `name` is one of the names above, else -1. */
int cepe_rope_type_parse(const char *name, cepe_rope_type *out);

/* "half" / "interleaved"; same contract as cepe_rope_type_parse. */
const char *cepe_rope_layout_name(cepe_rope_layout l);
int cepe_rope_layout_parse(const char *name, cepe_rope_layout *out);

/* The window L the variant measures lengths against (original_max_pos, else max_pos). */
int cepe_rope_original_len(const cepe_rope_config *rc);

/* The argument checks of cepe_e2llm_positions, so callers can validate before
 * allocating the (n_samples, R) output. */
cepe_status cepe_e2llm_check(int R, int L, int g_max, int n_samples);

/* A model's RoPE, ready to run: the settings (owning their longrope factor
 * copies), the table for short sequences and its magnitude. */
typedef struct {
    cepe_rope_config rc; /* short/long_factor point into `factors` */
    float *factors;      /* owned: short then long, rotary_dim/2 each */
    float *inv_freq;     /* (half) the table at seq_len 0 */
    float mscale;
    int half;             /* rotary pairs per head */
    int length_dependent; /* dynamic NTK / LongRoPE: tables depend on the call's length */
} rope_state;

/* From cfg->rope (or, when cfg->rope.head_dim == 0, default RoPE with
 * cfg->rope_theta over the whole head). */
cepe_status cepe_rope_setup(const cepe_config *cfg, rope_state *out);
void cepe_rope_release(rope_state *r);

/* The table for a call whose largest position is seq_len - 1, following HF's
 * runtime rules; *cached_len is the dynamic-NTK state of one request (start
 * it at cepe_rope_original_len). */
cepe_status cepe_rope_for_call(const rope_state *r, int seq_len, int *cached_len, float *inv_freq,
                               float *mscale);

#endif /* CEPE_ROPE_H */
