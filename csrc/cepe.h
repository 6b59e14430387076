/* cepe.h — the one public C API of the cepe core.
 *
 * Conventions
 *  - Every function that can fail returns a cepe_status; on failure
 *    cepe_last_error() holds a message for the calling thread.
 *  - Handles are opaque. A cepe_model holds borrowed pointers to weights
 *    (the caller keeps them alive and unchanged until cepe_model_free) and is
 *    immutable once cepe_model_finalize succeeds, so any number of threads
 *    may run contexts of one model at once.
 *  - A cepe_ctx is per-request state (KV cache, scratch); one thread at a
 *    time. It allocates everything when created: nothing is allocated in the
 *    per-token loop.
 *  - Linear weights are float32, row-major [out, in] (PyTorch layout).
 */
#ifndef CEPE_H
#define CEPE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CEPE_OK = 0,
    CEPE_ERR_INVALID_ARG = 1, /* a bad value or shape from the caller */
    CEPE_ERR_OUT_OF_MEMORY = 2,
    CEPE_ERR_MISSING_WEIGHT = 3,
    CEPE_ERR_UNSUPPORTED = 4, /* valid request this build cannot serve */
    CEPE_ERR_STATE = 5,       /* call order / capacity problems */
    CEPE_ERR_INTERRUPTED = 6, /* cepe_ctx_interrupt() was called */
    CEPE_ERR_BACKEND = 7,     /* BLAS / CUDA failure */
    CEPE_ERR_NUMERIC = 8      /* float32 overflowed: non-finite logits or gradient norm */
} cepe_status;

/* ---- RoPE types (functions below) ---------------------------------------- */
typedef enum {
    CEPE_ROPE_DEFAULT = 0,
    CEPE_ROPE_LINEAR = 1,  /* position interpolation (PI); E2-LLM at inference */
    CEPE_ROPE_DYNAMIC = 2, /* dynamic NTK: the base grows with seq_len */
    CEPE_ROPE_YARN = 3,
    CEPE_ROPE_LLAMA3 = 4,
    CEPE_ROPE_LONGROPE = 5
} cepe_rope_type;

/* Which dims form pair j: HALF (GPT-NeoX, HF checkpoints) pairs x[j] with
 * x[j + rotary_dim/2]; INTERLEAVED (GPT-J, Meta/GGUF weights) x[2j], x[2j+1]. */
typedef enum { CEPE_ROPE_HALF = 0, CEPE_ROPE_INTERLEAVED = 1 } cepe_rope_layout;

/* Start from cepe_rope_config_init(): NAN / 0 mark the optional fields unset. */
typedef struct {
    cepe_rope_type type;
    cepe_rope_layout layout;
    double theta; /* rope_theta */
    int head_dim;
    int rotary_dim; /* head_dim * partial_rotary_factor; even; dims past it are not rotated */
    double factor;  /* s; NAN = unset (yarn/longrope: max_pos / original_max_pos) */
    /* L, the pre-training window; <= 0 = max_pos (as HF). For dynamic, HF's L is
     * max_position_embeddings: cepe.rope.parse_rope stores that here. */
    int original_max_pos;
    int max_pos;                              /* max_position_embeddings; 0 = unknown */
    double low_freq_factor, high_freq_factor; /* llama3 (required) */
    double beta_fast, beta_slow;              /* yarn; NAN or 0 = 32 / 1 */
    double mscale, mscale_all_dim;            /* yarn (DeepSeek); NAN or 0 = unset */
    double attention_factor;                  /* yarn, longrope: M; NAN = derived from s */
    int truncate;                             /* yarn: floor/ceil the ramp bounds (default 1) */
    const float *short_factor, *long_factor;  /* longrope: rotary_dim/2 each, borrowed */
} cepe_rope_config;

/* Decoder hyper-parameters (the subset of an HF LlamaConfig the math needs). */
typedef struct {
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int tie_word_embeddings; /* lm_head shares embed_tokens */
    int sliding_window;      /* 0 = full causal attention (Mistral sets it) */
    float rms_norm_eps;
    double rope_theta;
    /* CEPE: cross-attention in the last n_cross_layers decoder layers, its
     * k/v projections reading encoder states of width encoder_hidden_size. */
    int n_cross_layers;
    int encoder_hidden_size;
    /* RoPE variant; rope.head_dim == 0 means the default variant with
     * rope_theta over the whole head (the model copies the factor arrays). */
    cepe_rope_config rope;
} cepe_config;

typedef struct cepe_model cepe_model;
typedef struct cepe_ctx cepe_ctx;
/* An op table (its layout is internal: csrc/backend.h). */
typedef struct cepe_backend cepe_backend;

/* ---- errors ------------------------------------------------------------ */
const char *cepe_last_error(void);
const char *cepe_status_name(cepe_status s);

/* ---- build info -------------------------------------------------------- */
/* The largest n_threads any call accepts: an OpenMP team larger than this
 * is a typo. */
#define CEPE_MAX_THREADS 1024
/* Human-readable BLAS name/config, and the OpenMP thread limit. */
const char *cepe_blas_info(void);
int cepe_max_threads(void);
/* Sets the BLAS thread count (process-wide: BLAS libraries keep one pool). */
void cepe_set_blas_threads(int n);

/* ---- model ------------------------------------------------------------- */
/* encoder_cfg: the CEPE context encoder (a bidirectional LLaMA), or NULL. Its
 * n_cross_layers / encoder_hidden_size / tie / sliding_window are ignored. */
cepe_status cepe_model_create(const cepe_config *cfg, const cepe_config *encoder_cfg, int n_threads,
                              cepe_model **out);
/* The same on a given backend (csrc/backend.h; NULL: the CPU). The backend
 * must outlive the model. On a device backend, bind copies each tensor to the
 * device (the caller's array need not stay valid) and every call moves its
 * inputs and outputs across. */
cepe_status cepe_model_create_on(const cepe_config *cfg, const cepe_config *encoder_cfg, int n_threads,
                                 const cepe_backend *be, cepe_model **out);
/* Stores the linear weights as bf16 on the device (rounded to nearest even
 * at bind; products accumulate in fp32; embeddings and norms stay fp32).
 * Before binding; device backends with bf16 GEMMs only (else UNSUPPORTED).
 * Inference only: training refuses such a model. */
cepe_status cepe_model_set_bf16(cepe_model *m);
/* The backend's name ("cpu", "cuda", ...). */
const char *cepe_model_backend_name(const cepe_model *m);
void cepe_model_free(cepe_model *m);
/* Binds one weight by its HF name ("model.layers.3.self_attn.q_proj.weight").
 * The shape must be the one the config implies; on the CPU data must stay
 * valid (it is used in place), on a device it is copied. */
cepe_status cepe_model_bind(cepe_model *m, const char *name, const float *data, int ndim,
                            const int64_t *shape);
/* cepe_model_bind for a weight in a stored format: qtype a GGML type id
 * (quant/quant.h's cepe_qtype: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
 * Q6_K), data the rows as the file stores them (cepe_qtype_row_bytes each,
 * back to back, 2-byte aligned), shape the values' (n_out, n_in). Matrices
 * only (norms are float32). The CPU multiplies the weights as they are; a
 * device backend widens them to fp32 (or bf16, see cepe_model_set_bf16) at
 * bind. */
cepe_status cepe_model_bind_q(cepe_model *m, const char *name, const void *data, int qtype, int ndim,
                              const int64_t *shape);
/* Checks every required weight is bound; after this the model is usable. */
cepe_status cepe_model_finalize(cepe_model *m);
const cepe_config *cepe_model_config(const cepe_model *m);
/* The CEPE encoder's config, or NULL for a plain decoder. */
const cepe_config *cepe_model_encoder_config(const cepe_model *m);

/* ---- CEPE context encoder -------------------------------------------------- */
/* Encodes n_chunks independent chunks of L tokens: bidirectional attention
 * within a chunk, padded keys (mask 0) excluded, RoPE positions = slot index
 * 0..L-1. out: (n_chunks, L, d_enc), the final-normed hidden states.
 * mask may be NULL (all real). Thread-safe (allocates its own scratch). */
cepe_status cepe_model_encode(const cepe_model *m, const int32_t *ids, const uint8_t *mask, int n_chunks,
                              int L, float *out);

/* ---- per-request context: KV cache + run state --------------------------- */
/* batch rows of up to `capacity` tokens each (prompt + generated). */
cepe_status cepe_ctx_create(const cepe_model *m, int batch, int capacity, cepe_ctx **out);
/* A context for one forward call whose K/V nobody reads afterwards (a
 * forward without a cache): its KV cache holds a single layer, n_layers
 * times less memory, and a call longer than one chunk runs layer by layer
 * (every chunk through a layer before the next layer), which leaves each
 * token's outputs as they would be otherwise. After its first call it cannot
 * be continued (further forward calls, generation) or saved. */
cepe_status cepe_ctx_create_single_pass(const cepe_model *m, int batch, int capacity, cepe_ctx **out);
void cepe_ctx_free(cepe_ctx *c);
void cepe_ctx_reset(cepe_ctx *c);
int cepe_ctx_length(const cepe_ctx *c); /* tokens per row already cached */
int cepe_ctx_capacity(const cepe_ctx *c);
int cepe_ctx_batch(const cepe_ctx *c);
/* Attaches CEPE context: encoder states (batch, N, d_enc) and their mask
 * (batch, N), 1 = real, or NULL. keep_kv: project each cross-attention
 * layer's K/V once now and keep them (fast decoding, memory
 * n_cross*batch*N*kv_dim*8 bytes; the states are not read again); else the
 * states must stay valid while attached and K/V are recomputed at every call
 * (memory-lean, identical results). N = 0 detaches. */
cepe_status cepe_ctx_set_context(cepe_ctx *c, const float *states, const uint8_t *mask, int N, int keep_kv);
/* Encodes the context and attaches it where the decoder reads it (device
 * memory on a GPU): ids (batch, n_chunks, L) chunks as cepe_model_encode
 * takes them, mask the same shape (1 = real) or NULL, keep_kv as above. The
 * states never cross to the caller (with keep_kv they are freed once the K/V
 * are made); progress counts batches of chunks and cepe_ctx_interrupt stops
 * it. On the CPU non-finite states are CEPE_ERR_NUMERIC. */
cepe_status cepe_ctx_encode_context(cepe_ctx *c, const int32_t *ids, const uint8_t *mask, int n_chunks, int L,
                                    int keep_kv);
int cepe_ctx_context_length(const cepe_ctx *c);

/* A request's cache by value (cepe_ctx_save / cepe_ctx_load), e.g. to pickle
 * it: the first len positions of every layer's K (RoPE applied) and V, which
 * of them are real tokens, each row's next position, the RoPE table the
 * request has grown to and the last logits. Sizes: cepe_ctx_state_sizes. An
 * attached CEPE context is not part of it (attach it again). */
typedef struct {
    int len;            /* tokens per row */
    float *k, *v;       /* (n_layers, batch, len, kv_dim) each */
    uint8_t *valid;     /* (batch, len) 1 = real token */
    double *next_pos;   /* (batch) */
    float *inv_freq;    /* (rope_half) */
    float *last_logits; /* (batch, vocab) */
    float rope_mscale;
    int rope_cached_len; /* dynamic NTK: the longest sequence seen */
    int rope_len_hint;   /* cepe_ctx_set_rope_length */
    int has_logits;      /* 1 after a forward call: generate may continue */
} cepe_ctx_state;
/* n_layers, kv_dim (n_kv_heads * head_dim) and rope_half of the arrays above. */
void cepe_ctx_state_sizes(const cepe_ctx *c, int *n_layers, int *kv_dim, int *rope_half);
/* Copies c's state into st's arrays, sized for st->len = cepe_ctx_length(c). */
cepe_status cepe_ctx_save(const cepe_ctx *c, cepe_ctx_state *st);
/* Replaces c's cache with st (st->len <= capacity; same batch and model shape). */
cepe_status cepe_ctx_load(cepe_ctx *c, const cepe_ctx_state *st);

/* Pins the sequence length that length-dependent RoPE (dynamic NTK,
 * LongRoPE) sees to at least seq_len, so a long input fed in slices gets the
 * table the whole input would get (0 = each call's own length). */
void cepe_ctx_set_rope_length(cepe_ctx *c, int seq_len);

/* Asks a running forward/generate on this ctx to stop soon (any thread). A
 * stopped forward leaves the context as it was before that call. */
/* Progress of the forward call running on c (safe to call from any thread):
 * *done of *total layer passes (layers x chunks); *total is 0 before the first call. */
void cepe_ctx_progress(const cepe_ctx *c, long *done, long *total);
void cepe_ctx_interrupt(cepe_ctx *c);

typedef enum {
    CEPE_LOGITS_NONE = 0, /* keep only the last position's logits inside ctx */
    CEPE_LOGITS_LAST = 1, /* write (batch, vocab) */
    CEPE_LOGITS_ALL = 2   /* write (batch, T, vocab) */
} cepe_logits_mode;

/* Appends T tokens to every row and runs the decoder over them.
 *  ids:       (batch, T) token ids
 *  positions: (batch, T) RoPE positions, or NULL for "count of real tokens
 *             before this one in the row" (HF's cumsum(mask) - 1)
 *  mask:      (batch, T) 1 = real token, 0 = padding (never attended), or NULL
 *  logits:    see cepe_logits_mode; may be NULL with CEPE_LOGITS_NONE */
cepe_status cepe_ctx_forward(cepe_ctx *c, const int32_t *ids, const double *positions, const uint8_t *mask,
                             int T, float *logits, cepe_logits_mode mode);

/* cepe_ctx_forward that scores instead of returning logits: nll (batch, T)
 * gets -log softmax(logits at (b, t))[targets (b, t)], or 0 where the target
 * is -100 (not scored). Logits are formed a few rows at a time, so scoring a
 * long input never holds a (T, vocab) array. Same cache effects as forward. */
cepe_status cepe_ctx_forward_nll(cepe_ctx *c, const int32_t *ids, const double *positions,
                                 const uint8_t *mask, int T, const int32_t *targets, float *nll);

/* ---- sampling -------------------------------------------------------------
 * A sampler turns a row's logits into its next token through one chain, in
 * llama.cpp's order (common/sampling.cpp, common_sampler_init: the logit bias,
 * then common_params_sampling.samplers):
 *   1. logit bias    z[i] += bias[i] (-INFINITY bans a token)
 *   2. penalties     for each token i seen c[i] > 0 times in the row's last
 *                    repeat_last_n tokens: z[i] /= repeat_penalty if z[i] > 0,
 *                    else z[i] *= repeat_penalty; then
 *                    z[i] -= c[i] * frequency_penalty + presence_penalty
 *   3. top-k         the k largest z
 *   4. typical-p     Meister et al.'s locally typical set: tokens by |-log p - H|
 *                    ascending, the shortest prefix holding mass >= typical_p
 *   5. top-p         tokens by p descending, the shortest prefix holding mass >= top_p
 *   6. min-p         tokens with p >= min_p * max p
 *   7. temperature   p = softmax(z / T) over what is left; T = 0: the largest z left
 *   8. draw          one uniform per token from a splitmix64 stream seeded by seed
 * p in steps 4-6 is softmax(z) over the tokens the earlier steps left (the
 * temperature only shapes the final draw, as in llama.cpp). Each filter keeps
 * at least one token; an off setting skips its step. */
typedef struct {
    float temperature;       /* 0 = greedy */
    int top_k;               /* 0 = off */
    float top_p;             /* 1 = off */
    float min_p;             /* 0 = off */
    float typical_p;         /* 1 = off */
    float repeat_penalty;    /* 1 = off */
    float frequency_penalty; /* 0 = off */
    float presence_penalty;  /* 0 = off */
    int repeat_last_n;       /* the penalties' window: 0 = no penalties, -1 = every token accepted */
    const int32_t *bias_ids; /* (n_bias) token ids */
    const float *bias;       /* (n_bias) added to their logits; finite or -INFINITY */
    int n_bias;
    uint64_t seed;
    const int32_t *eos_ids; /* a row finishes after emitting any of these */
    int n_eos;
    int pad_token_id; /* written after a row finished */
    /* Stop strings: a row finishes once its generated text contains one. The
     * text is matched as bytes: token i's are token_text[token_offsets[i] ..
     * token_offsets[i + 1]) (vocab_size + 1 offsets); stop string j is
     * stop_text[stop_offsets[j] .. stop_offsets[j + 1]) (n_stop + 1 offsets). */
    const uint8_t *token_text;
    const int32_t *token_offsets;
    const uint8_t *stop_text;
    const int32_t *stop_offsets;
    int n_stop;
} cepe_sampling;

typedef struct cepe_sampler cepe_sampler;

typedef enum {
    CEPE_FINISH_NONE = 0, /* still generating */
    CEPE_FINISH_EOS = 1,  /* emitted an eos token */
    CEPE_FINISH_STOP = 2  /* its text reached a stop string */
} cepe_finish;

/* A sampler for `batch` rows over a vocabulary of vocab_size: the settings
 * (checked; the arrays are copied), one random stream and each row's token
 * window and finish state. One thread at a time. */
cepe_status cepe_sampler_create(const cepe_sampling *s, int batch, int vocab_size, cepe_sampler **out);
void cepe_sampler_free(cepe_sampler *s);
/* Adds tokens to each row's penalty window (the prompt, before generating):
 * ids (batch, T); mask (batch, T) 1 = real, or NULL. */
cepe_status cepe_sampler_accept(cepe_sampler *s, const int32_t *ids, const uint8_t *mask, int T);
/* The distribution row's next token would be drawn from, given its logits
 * (vocab_size): probs (vocab_size), 0 for every token the chain removed, one
 * 1 at temperature 0. Changes no state. */
cepe_status cepe_sampler_distribution(cepe_sampler *s, int row, const float *logits, float *probs);

/* Log-probabilities to report with sampled tokens: those of the raw logits'
 * log-softmax (before bias and penalties). Any pointer may be NULL. */
typedef struct {
    float *logprob;      /* the chosen token's */
    int n_top;           /* alternatives per token, 0..vocab_size */
    int32_t *top_ids;    /* (n_top) the most likely tokens, best first (ties: lower id) */
    float *top_logprobs; /* (n_top) theirs */
} cepe_logprobs;

/* Picks row's next token from its logits (vocab_size), then accepts it: its
 * window, its text for the stop strings, its finish state. lp may be NULL. */
cepe_status cepe_sampler_sample(cepe_sampler *s, int row, const float *logits, int32_t *token,
                                const cepe_logprobs *lp);
/* A cepe_finish: why row stopped, or CEPE_FINISH_NONE. */
int cepe_sampler_finished(const cepe_sampler *s, int row);
/* How many tokens row has sampled (its finishing token included). */
long cepe_sampler_generated(const cepe_sampler *s, int row);

/* Samples up to max_new tokens per row with s (made for this context's batch
 * and the model's vocabulary), starting from the logits the last forward left
 * in the context. out: (batch, max_new). *n_out receives the number of steps
 * taken (fewer once every row finished; 0 if all had finished before the
 * call). Finished rows get pad_token_id. lp, if not NULL, points into arrays
 * laid out (batch, max_new) and (batch, max_new, n_top); padded steps get
 * logprob NaN and ids -1. The last sampled token is not fed back: to
 * continue, forward it first. */
cepe_status cepe_ctx_generate(cepe_ctx *c, cepe_sampler *s, int max_new, int32_t *out, int *n_out,
                              const cepe_logprobs *lp);

/* ==== RoPE: frequency tables of the scaling variants, E2-LLM positions ====
 *
 * Every variant reduces to a per-pair inverse frequency w'_j (j < rotary_dim/2)
 * and a magnitude M that multiplies cos and sin (so logits scale by M^2):
 * a token at position p rotates pair j by p * w'_j. The numbers match
 * transformers 5.23 (modeling_rope_utils._compute_*_parameters). */

/* Sets the default variant for (theta, head_dim) with every option unset. */
void cepe_rope_config_init(cepe_rope_config *rc, double theta, int head_dim);

/* Validates the settings; the message names the offending key
 * ("rope_scaling.factor must be >= 1, got 0.5"). */
cepe_status cepe_rope_check(const cepe_rope_config *rc);

/* Per-pair inverse frequencies inv_freq[rotary_dim/2] and the magnitude
 * (may be NULL) for a sequence of seq_len tokens (max position + 1; 0 =
 * unknown, i.e. the initial table). seq_len only matters for dynamic (NTK
 * base once seq_len > L) and longrope (long factors once seq_len > L).
 * Computed in double, stored as float. Checks rc first. */
cepe_status cepe_rope_frequencies(const cepe_rope_config *rc, int seq_len, float *inv_freq, float *magnitude);

/* E2-LLM training positions (arXiv:2401.06951, Alg. 1) for n_samples windows
 * of R tokens of a base model with context L. Per sample: g ~ U{1..g_max},
 * t ~ U{0..max(0, g*L - R)}; position m is m for m < 4 (attention sinks) and
 * m + t otherwise, then divided by g. positions: (n_samples, R); scales and
 * offsets (n_samples each, may be NULL) receive g and t. Deterministic for a
 * seed (xoshiro256**, unbiased integer draws); g_max * L must fit in int32. */
cepe_status cepe_e2llm_positions(int R, int L, int g_max, int n_samples, uint64_t seed, double *positions,
                                 int32_t *scales, int32_t *offsets);
/* ==== end RoPE ============================================================ */

/* ==== training: AdamW, clipping, schedule, CEPE backward =========
 * Everything here works on flat fp32 buffers (llm.c style): the trainable
 * weights, their gradients and the two AdamW moments each live in one array,
 * tensor after tensor. Written to reproduce torch.optim.AdamW,
 * torch.nn.utils.clip_grad_norm_ and HF's cosine schedule (spec CEPE.md §6). */

typedef struct {
    double beta1, beta2; /* (0.9, 0.999) in the reference runs */
    double eps;          /* 1e-8 */
} cepe_adamw_config;

/* HF TrainingArguments.get_warmup_steps: ceil(total_steps * warmup_ratio). */
long cepe_warmup_steps(double warmup_ratio, long total_steps);
/* The learning rate of optimizer step `step` (0-based) under HF's cosine
 * schedule with linear warmup (get_cosine_schedule_with_warmup): step 0 runs
 * at the full base_lr when warmup_steps is 0. */
double cepe_lr_at(double base_lr, long step, long warmup_steps, long total_steps);
/* The L2 norm of g[0..n), summed in double over fixed chunks in a fixed
 * order: the same bits whatever n_threads is. */
double cepe_grad_norm(const float *g, size_t n, int n_threads);
/* torch.nn.utils.clip_grad_norm_: scales g by max_norm / (norm + 1e-6) when
 * that is below 1; max_norm <= 0 turns clipping off. Returns the norm before
 * clipping. */
double cepe_clip_grad_norm(float *g, size_t n, double max_norm, int n_threads);
/* One AdamW step (t = 1, 2, ... for the bias corrections) on n parameters:
 * p *= 1 - lr * weight_decay (decoupled), then Adam with moments m, v. */
void cepe_adamw_update(float *p, const float *g, float *m, float *v, size_t n, double lr,
                       const cepe_adamw_config *h, double weight_decay, long t, int n_threads);

/* ---- the training state of a CEPE model ----------------------------------
 * Which weights train (spec §6.1). Everything else is frozen: no gradient or
 * optimizer state exists for it, though gradients flow through its
 * activations to the trainable tensors below it. */
typedef enum {
    CEPE_TRAIN_CROSS_ATTN = 0,         /* names containing "cross_attn"; the encoder's output is detached */
    CEPE_TRAIN_CROSS_ATTN_ENCODER = 1, /* plus every "encoder." tensor (--train_encoder) */
    CEPE_TRAIN_ALL = 2                 /* every weight (--train_everything; small models) */
} cepe_trainable;

typedef struct {
    cepe_trainable trainable;
    double lr;           /* peak learning rate of the cosine schedule */
    double weight_decay; /* decoupled; applied to 2-D weights only (not norm weights), as HF Trainer */
    double warmup_ratio; /* warmup steps = ceil(total_steps * warmup_ratio) */
    long total_steps;
    double clip; /* max global gradient norm; <= 0 = no clipping */
    cepe_adamw_config adam;
    double lm_loss_cof, kl_loss_cof;
    int kl_mode;       /* 0 = smooth_δ, 1 = drop (ops.h's CEPE_KL_*) */
    double kl_delta;   /* δ of smooth_δ */
    long logit_floats; /* logits formed at a time (rows x vocab); 0 = 2^21 */
} cepe_train_config;

/* The defaults every field starts from: cross-attention trains at lr 1e-4
 * for one step, no weight decay or warmup, clipping at 1, AdamW (0.9, 0.999,
 * 1e-8), the LM loss alone (lm_loss_cof 1, kl_loss_cof 0). */
void cepe_train_config_init(cepe_train_config *c);

typedef struct cepe_train cepe_train;

/* The flat-buffer layout of a trainable set: its tensors in the model's
 * weight order, each starting at a multiple of 16 floats. *n_params: floats
 * in each flat buffer (params, grads, moments). */
cepe_status cepe_train_layout(const cepe_model *m, cepe_trainable which, int *n_tensors, size_t *n_params);
/* Tensor i of that layout: its HF name (owned by the model), shape, offset. */
cepe_status cepe_train_tensor(const cepe_model *m, cepe_trainable which, int i, const char **name, int *ndim,
                              int64_t shape[2], size_t *offset);

/* Weight i of a model, in its binding order (i >= the count: INVALID_ARG):
 * HF name (owned by the model), data (NULL while unbound; float32 values, or
 * the stored rows of a matrix bound with cepe_model_bind_q: see
 * cepe_model_weight_format) and shape (shape[1] = 0 for 1-D). A tied lm_head
 * is not a weight of its own. */
cepe_status cepe_model_weight_at(const cepe_model *m, int i, const char **name, const float **data, int *ndim,
                                 int64_t shape[2]);
/* 1 when the model's weights live in device memory (data above is then a
 * device pointer: read it with cepe_model_read_weight). */
int cepe_model_on_device(const cepe_model *m);
/* Weight i's stored format: its GGML type id (0 = F32) and the bytes of its
 * data (rows back to back). */
cepe_status cepe_model_weight_format(const cepe_model *m, int i, int *qtype, size_t *nbytes);
/* Copies weight i (as cepe_model_weight_at numbers them) to host memory as
 * float32 (a stored format widened exactly). */
cepe_status cepe_model_read_weight(const cepe_model *m, int i, float *dst);

/* A training state over a finalized model whose trainable weights are bound
 * to params + offset (checked: that is how updates reach the model), and
 * the AdamW moments adam_m, adam_v; all three (n_params floats) stay owned by
 * the caller and must outlive the state. On a device backend the model's
 * device copies of the trainable weights are set from params, the moments
 * are copied to the device, and cepe_train_sync_host writes all three back. step: optimizer steps already
 * taken (0, or the step of a resumed checkpoint). While training, the model must not run elsewhere: updates
 * write its weights in place. */
cepe_status cepe_train_create(const cepe_model *m, const cepe_train_config *c, float *params, float *adam_m,
                              float *adam_v, long step, cepe_train **out);
void cepe_train_free(cepe_train *t);

/* One micro-batch. Rows are B sequences of T decoder tokens; the CEPE context
 * is n_ctx chunks of L encoder tokens per row (n_ctx = 0: none). */
typedef struct {
    int B, T;
    const int32_t *input_ids;      /* (B, T) */
    const uint8_t *attention_mask; /* (B, T) 1 = token, or NULL */
    const int32_t *labels;         /* (B, T), -100 = ignored; NULL = input_ids (padding ignored) */
    const double *positions;       /* (B, T) RoPE positions (E2-LLM), or NULL = count of real tokens before */
    int n_ctx, L;
    const int32_t *encoder_input_ids;      /* (B, n_ctx, L) */
    const uint8_t *encoder_attention_mask; /* (B, n_ctx, L), or NULL */
    /* CEPED: teacher tables for the last T_kl positions (T_kl = 0: no KL);
     * the KL is the mean over all B*T_kl rows (KLDivLoss "batchmean") */
    int T_kl, K;
    const uint16_t *distill_prob; /* (B, T_kl, K+1) IEEE half bits: top-K probabilities + remainder */
    const int32_t *distill_index; /* (B, T_kl, K) */
} cepe_train_batch;

typedef struct {
    double loss;      /* lm_loss_cof * lm_loss + kl_loss_cof * kl_loss */
    double lm_loss;   /* mean shifted cross-entropy over non-ignored tokens */
    double kl_loss;   /* mean KL(teacher || student) per table row */
    double grad_norm; /* global norm before clipping (cepe_train_update) */
    double lr;        /* the lr of the update (cepe_train_update) */
    long tokens;      /* non-ignored label tokens */
} cepe_train_stats;

/* Sets every gradient to zero (the start of an optimizer step). */
void cepe_train_zero_grad(cepe_train *t);
/* Forward and backward of one micro-batch: gradients of
 * grad_scale * (lm_loss_cof * lm_loss + kl_loss_cof * kl_loss) are ADDED to
 * the gradient buffer (grad_scale = 1 / grad_accum). Fills the loss fields. */
cepe_status cepe_train_forward_backward(cepe_train *t, const cepe_train_batch *b, double grad_scale,
                                        cepe_train_stats *out);
/* Clips the gradients, runs AdamW at the scheduled lr and counts the step;
 * fills grad_norm and lr. */
cepe_status cepe_train_update(cepe_train *t, cepe_train_stats *out);
/* Copies the flat gradient buffer (n_params floats) to dst. */
cepe_status cepe_train_copy_grads(const cepe_train *t, float *dst);
/* The flat gradient buffer itself (n_params floats, the layout's order), in
 * backend memory (*on_device = 1: device memory, reached only through that
 * device's API). It lives as long as t; between the last forward_backward
 * and cepe_train_update a data-parallel caller may average it in place. */
cepe_status cepe_train_grad_buffer(cepe_train *t, float **grads, size_t *n, int *on_device);
/* On a device backend, copies the trainable weights, and the moments, back
 * into the caller's params / adam_m / adam_v (the state of record for saving);
 * on the CPU they are the state already (no-op). */
cepe_status cepe_train_sync_host(cepe_train *t);
/* The reverse: the caller's buffers (edited on the host, e.g. a resumed
 * optimizer state) to the device. No-op on the CPU. */
cepe_status cepe_train_sync_device(cepe_train *t);
/* Optimizer steps taken, and setting that count (resume). */
long cepe_train_steps(const cepe_train *t);
void cepe_train_set_steps(cepe_train *t, long step);
/* ==== end training ========================================================= */

#ifdef __cplusplus
}
#endif
#endif /* CEPE_H */
