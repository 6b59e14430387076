/* rope_freq.c — per-pair RoPE frequencies for a config. The default variant:
 * inv_freq[i] = theta^(-2i/d), as HF's _compute_default_rope_parameters.
 * Scaled variants (linear, NTK, YaRN, llama3, longrope) land here with the
 * RoPE issue. */
#include <math.h>

#include "common.h"
#include "model/model.h"

cepe_status cepe_rope_init(const cepe_config *cfg, float **inv_freq, int *half) {
    if (!(cfg->rope_theta > 1.0) || !isfinite(cfg->rope_theta))
        return cepe_fail(CEPE_ERR_INVALID_ARG, "rope_theta must be a finite number > 1, got %g",
                         cfg->rope_theta);
    const int h = cfg->head_dim / 2;
    float *f = cepe_calloc((size_t)h, sizeof(float));
    if (!f) return cepe_fail(CEPE_ERR_OUT_OF_MEMORY, "out of memory for RoPE frequencies");
    for (int i = 0; i < h; i++) f[i] = (float)(1.0 / pow(cfg->rope_theta, (2.0 * i) / cfg->head_dim));
    *inv_freq = f;
    *half = h;
    return CEPE_OK;
}
