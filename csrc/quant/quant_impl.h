/* quant_impl.h — what the files of csrc/quant/ share: ggml's block layouts,
 * the activation blocks, half-precision conversions and the kernels of each
 * instruction set. Not for model code (quant.h is its API). */
#ifndef CEPE_QUANT_IMPL_H
#define CEPE_QUANT_IMPL_H

#include <stdint.h>
#include <string.h>

#include "../common.h"
#include "quant.h"

/* ------------------------------------------------------------ stored blocks
 * Byte for byte as ggml writes them (ggml-common.h); fp16 fields are raw
 * uint16_t so the structs need only 2-byte alignment and have no padding. */

#define QK32 32  /* values per block of Q4_0, Q4_1, Q8_0 */
#define QK_K 256 /* values per super-block of the K-quants */

typedef struct {
    uint16_t d;     /* scale, fp16 */
    uint8_t qs[16]; /* value j: (qs[j] & 15) - 8, value j+16: (qs[j] >> 4) - 8 */
} block_q4_0;

typedef struct {
    uint16_t d, m;  /* scale and minimum, fp16: value = d * q + m */
    uint8_t qs[16]; /* nibbles as in Q4_0, unsigned 0..15 */
} block_q4_1;

typedef struct {
    uint16_t d; /* scale, fp16 */
    int8_t qs[32];
} block_q8_0;

/* K-quants: 256 values in 8 sub-blocks of 32, each with a 6-bit scale and a
 * 6-bit minimum packed into 12 bytes (quant_scale_min_k4 unpacks them):
 * value = d * sc * q - dmin * m. */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[128]; /* bytes 32i..32i+31: sub-block 2i in the low nibbles, 2i+1 in the high */
} block_q4_K;

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[32];  /* bit i of qh[l]: the fifth bit of value 32i + l */
    uint8_t qs[128]; /* low four bits, laid out as in Q4_K */
} block_q5_K;

/* 16 sub-blocks of 16 with int8 scales: value = d * sc * (q - 32), q 6 bits. */
typedef struct {
    uint8_t ql[128]; /* per half (64 bytes): values 0..63 low nibbles, 64..127 high nibbles */
    uint8_t qh[64];  /* per half (32 bytes): bits 2k..2k+1 of qh[l] are the top bits of value 32k + l */
    int8_t scales[16];
    uint16_t d;
} block_q6_K;

_Static_assert(sizeof(block_q4_0) == 18, "Q4_0 block");
_Static_assert(sizeof(block_q4_1) == 20, "Q4_1 block");
_Static_assert(sizeof(block_q8_0) == 34, "Q8_0 block");
_Static_assert(sizeof(block_q4_K) == 144, "Q4_K block");
_Static_assert(sizeof(block_q5_K) == 176, "Q5_K block");
_Static_assert(sizeof(block_q6_K) == 210, "Q6_K block");

/* ------------------------------------------------------------ activation blocks
 * Never stored in files, so the scale is fp32 (ggml's Q8_0 rounds it to fp16,
 * which only adds error). */

/* A row of n activations in blocks of 32, as int8 in [-127, 127]: x ≈ d * qs.
 * Laid out as arrays, not as an array of blocks, so a kernel loads the scales
 * of 8 or 16 blocks with one instruction (the row is prepared once and
 * multiplied by every weight row, so its layout is ours to choose):
 *   int8  qs[n]     the values, block b at qs + 32 b
 *   float d[n/32]   scales
 *   float s[n/32]   d * Σ qs, the minimum term of Q4_1 weights
 *   int   sum[n/32] Σ qs, the offset terms of Q4_0 / Q8_0 weights, kept exact */
typedef struct {
    const int8_t *qs;
    const float *d, *s;
    const int32_t *sum;
} act_q8_32;

#define ACT_Q8_32_BYTES_PER_BLOCK (32 + 3 * 4)

static inline act_q8_32 quant_act_q8_32(const void *act, int n) {
    const int8_t *qs = act;
    const float *d = (const float *)(qs + n);
    act_q8_32 a = {qs, d, d + n / 32, (const int32_t *)(d + 2 * (n / 32))};
    return a;
}

/* 256 activations (ggml's block_q8_K): d = -max/127 for the value of largest
 * magnitude, qs in [-127, 127], bsums[i] = Σ qs[16i..16i+15]. */
typedef struct {
    float d;
    int8_t qs[256];
    int16_t bsums[16];
} act_q8_K;

_Static_assert(sizeof(act_q8_K) == 292, "act_q8_K");

/* What a kernel expects as its activation row. */
typedef enum {
    ACT_F32 = 0,   /* the fp32 row itself */
    ACT_Q8_32 = 1, /* act_q8_32 */
    ACT_Q8_K = 2,  /* act_q8_K blocks */
    ACT_BF16 = 3,  /* bf16, rounded to nearest even */
} act_kind;

/* The dot product of one stored row of n values and one activation row. */
typedef float (*quant_dot_fn)(int n, const void *row, const void *act);

typedef struct {
    quant_dot_fn dot;
    act_kind act;
} quant_kernel;

/* Kernel table indices (quant_type_index); QT_F32 has no GGML type index. */
enum { QT_F16, QT_BF16, QT_Q4_0, QT_Q4_1, QT_Q8_0, QT_Q4_K, QT_Q5_K, QT_Q6_K, QT_F32, QT_COUNT };

/* ------------------------------------------------------------ fp16 / bf16 */

static inline float quant_f32_from_bits(uint32_t w) {
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}

static inline uint32_t quant_f32_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof w);
    return w;
}

/* IEEE half -> float, exact (normals, subnormals, infinities; NaN stays NaN).
 * Bit arithmetic, so the portable path needs no F16C. */
static inline float quant_fp16_to_fp32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    /* normals: move the exponent into place and rebias by a multiply */
    const float normalized = quant_f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    /* subnormals: the mantissa as the low bits of 0.5's and subtract 0.5 */
    const float denormalized = quant_f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t bits = two_w < (1u << 27) ? quant_f32_bits(denormalized) : quant_f32_bits(normalized);
    return quant_f32_from_bits(sign | bits);
}

static inline float quant_bf16_to_fp32(uint16_t h) { return quant_f32_from_bits((uint32_t)h << 16); }

/* float -> bf16, round to nearest even; NaN stays NaN (quiet). */
static inline uint16_t quant_fp32_to_bf16(float f) {
    const uint32_t u = quant_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

/* Weight i of an F32 (QT_F32), F16 or BF16 row as a float. */
static inline float quant_weight_at(int kind, const void *row, int i) {
    if (kind == QT_F32) return ((const float *)row)[i];
    const uint16_t h = ((const uint16_t *)row)[i];
    return kind == QT_F16 ? quant_fp16_to_fp32(h) : quant_bf16_to_fp32(h);
}

/* The 6-bit scale and minimum of sub-block j (0..7) of a Q4_K / Q5_K block. */
static inline void quant_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* All 8 scales (out[0..7]) and minimums (out[8..15]) of a Q4_K / Q5_K block
 * at once: ggml's word-wise unpacking (x86 and other little-endian CPUs). */
static inline void quant_unpack_k4(const uint8_t q[12], uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, q, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3fu;
    memcpy(out, u, 16);
}

/* Block b of a Q4_K row, or of a Q5_K row (q5) with its fifth bits qh (NULL
 * for Q4_K): one kernel loop serves both, inlined with a constant q5. */
typedef struct {
    uint16_t d, dmin;
    const uint8_t *scales, *qs, *qh;
} k4_view;

static inline k4_view quant_k4_block(int q5, const void *row, int64_t b) {
    if (q5) {
        const block_q5_K *x = (const block_q5_K *)row + b;
        return (k4_view){x->d, x->dmin, x->scales, x->qs, x->qh};
    }
    const block_q4_K *x = (const block_q4_K *)row + b;
    return (k4_view){x->d, x->dmin, x->scales, x->qs, NULL};
}

/* The 256 values of a Q6_K block as q - 32 (-32..31), in value order. */
static inline void quant_unpack_q6_K(const block_q6_K *x, int8_t q[256]) {
    for (int half = 0; half < 2; half++) {
        const uint8_t *ql = x->ql + 64 * half, *qh = x->qh + 32 * half;
        int8_t *o = q + 128 * half;
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
            o[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

/* ------------------------------------------------------------ kernels
 * One table per instruction set, indexed by quant_type_index(); a NULL dot
 * means "use the path below". QT_F32 has no type index: F32 weights take
 * its kernel for one activation row and the BLAS sgemm for more (cepe_qmatmul). */

/* Fills table t with the kernels of the file it is used in, each file naming
 * them alike (dot_f32 .. dot_q6_K); the BF16 entry is given (bf16_dot, bf16_act). */
#define QUANT_KERNEL_TABLE(t, bf16_dot, bf16_act)                                                            \
    do {                                                                                                     \
        (t)[QT_F32] = (quant_kernel){dot_f32, ACT_F32};                                                      \
        (t)[QT_F16] = (quant_kernel){dot_f16, ACT_F32};                                                      \
        (t)[QT_BF16] = (quant_kernel){bf16_dot, bf16_act};                                                   \
        (t)[QT_Q4_0] = (quant_kernel){dot_q4_0, ACT_Q8_32};                                                  \
        (t)[QT_Q4_1] = (quant_kernel){dot_q4_1, ACT_Q8_32};                                                  \
        (t)[QT_Q8_0] = (quant_kernel){dot_q8_0, ACT_Q8_32};                                                  \
        (t)[QT_Q4_K] = (quant_kernel){dot_q4_K, ACT_Q8_K};                                                   \
        (t)[QT_Q5_K] = (quant_kernel){dot_q5_K, ACT_Q8_K};                                                   \
        (t)[QT_Q6_K] = (quant_kernel){dot_q6_K, ACT_Q8_K};                                                   \
    } while (0)

void quant_kernels_c(quant_kernel table[QT_COUNT]);
void quant_kernels_avx2(quant_kernel table[QT_COUNT]);
/* has_bf16: the CPU has AVX512-BF16 (BF16 then takes bf16 activations). */
void quant_kernels_avx512(quant_kernel table[QT_COUNT], int has_bf16);

/* ------------------------------------------------------------ many-row products */

/* Fewer multiply-adds than this do not pay for waking a second thread. */
#define QUANT_MIN_PARALLEL_WORK (1 << 17)
/* The GEMMs convert and multiply the activations this many rows at a time,
 * so their scratch stops growing there (the model sizes it once for any
 * number of rows, csrc/model/weights.c) while a packed panel of weights still
 * serves a prefill's 512 rows. */
#define QUANT_GEMM_CHUNK_ROWS 512
/* Scratch starts and parts are aligned to a cache line. */
#define QUANT_ALIGN 64
static inline size_t quant_align_up(size_t n) { return (n + QUANT_ALIGN - 1) / QUANT_ALIGN * QUANT_ALIGN; }

/* Many activation rows by Q4_0, Q4_1 or Q8_0 weights in int8
 * (gemm_blocks32_avx512.c, on the AVX-512 path only: callers check
 * cepe_quant_isa() first; elsewhere these are stubs): out[r, o] (+)= act row r · weight row o for
 * output rows [o0, o1) (o0 a multiple of 16), act the rows' act_q8_32 forms
 * ab bytes apart, out rows n_out floats apart. panel: 64-byte aligned scratch
 * of quant_gemm_panel_bytes(type, n_in) bytes, one per thread. */
void quant_gemm_blocks32_avx512(float *out, const cepe_qtensor *w, const unsigned char *act, size_t ab,
                                int rows, int accumulate, int o0, int o1, unsigned char *panel);
size_t quant_gemm_panel_bytes(int type, int n_in);

/* The table index of a GGML type id, -1 for F32 and unknown types. */
int quant_type_index(int type);
/* The kernel the current ISA uses for a type (valid, F32 included). */
quant_kernel quant_kernel_for(int type);
/* Fills act with x[n] in the given form (n a multiple of its block). */
void quant_prepare_act(act_kind kind, const float *x, void *act, int64_t n);
size_t quant_act_bytes(act_kind kind, int64_t n);
/* y[n] = the stored row, unchecked (cepe_dequantize_row checks). */
void quant_dequantize(int type, const void *row, float *y, int64_t n);

/* ------------------------------------------------------------ bf16 GEMM (gemm_bf16_avx512.c) */

/* Whether the bf16 GEMM runs now: the AVX-512 path selected on a CPU with
 * AVX512-BF16 (CEPE_ISA=avx2 turns it off). */
int quant_bf16_gemm_ready(void);
/* Scratch bytes of quant_bf16_gemm_forward (from a 64-byte aligned start). */
size_t quant_bf16_gemm_work_size(int rows, int n_in, int n_out, int n_threads);
/* out[rows, n_out] (=|+=) x · Wᵀ for BF16 weights, x rounded to bf16, fp32
 * sums; work: quant_bf16_gemm_work_size bytes, 64-byte aligned. */
void quant_bf16_gemm_forward(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                             void *work, int n_threads);
/* dinp[rows, n_in] (=|+=) dout · W for BF16 weights, dout rounded to bf16. */
cepe_status quant_bf16_gemm_backward(float *dinp, const float *dout, const cepe_qtensor *w, int rows,
                                     int accumulate, int n_threads);

#endif /* CEPE_QUANT_IMPL_H */
