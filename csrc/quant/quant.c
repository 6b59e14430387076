/* quant.c — the formats' table, the activation quantizers and the choice of
 * instruction set. */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "quant_impl.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#endif

/* ------------------------------------------------------------ formats */

typedef struct {
    int type;
    const char *name;
    int block;       /* values per block */
    int block_bytes; /* bytes per block */
    int align;       /* alignment the block's fields need */
} type_info;

static const type_info TYPES[] = {
    {CEPE_QTYPE_F32, "F32", 1, 4, 4},
    {CEPE_QTYPE_F16, "F16", 1, 2, 2},
    {CEPE_QTYPE_BF16, "BF16", 1, 2, 2},
    {CEPE_QTYPE_Q4_0, "Q4_0", QK32, sizeof(block_q4_0), 2},
    {CEPE_QTYPE_Q4_1, "Q4_1", QK32, sizeof(block_q4_1), 2},
    {CEPE_QTYPE_Q8_0, "Q8_0", QK32, sizeof(block_q8_0), 2},
    {CEPE_QTYPE_Q4_K, "Q4_K", QK_K, sizeof(block_q4_K), 2},
    {CEPE_QTYPE_Q5_K, "Q5_K", QK_K, sizeof(block_q5_K), 2},
    {CEPE_QTYPE_Q6_K, "Q6_K", QK_K, sizeof(block_q6_K), 2},
};

static const type_info *find_type(int type) {
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

const char *cepe_qtype_name(int type) {
    const type_info *t = find_type(type);
    return t ? t->name : NULL;
}

int cepe_qtype_block_size(int type) {
    const type_info *t = find_type(type);
    return t ? t->block : 0;
}

size_t cepe_qtype_row_bytes(int type, int64_t n) {
    const type_info *t = find_type(type);
    if (!t || n <= 0 || n % t->block) return 0;
    return (size_t)(n / t->block) * (size_t)t->block_bytes;
}

int quant_type_index(int type) {
    switch (type) {
    case CEPE_QTYPE_F16:
        return QT_F16;
    case CEPE_QTYPE_BF16:
        return QT_BF16;
    case CEPE_QTYPE_Q4_0:
        return QT_Q4_0;
    case CEPE_QTYPE_Q4_1:
        return QT_Q4_1;
    case CEPE_QTYPE_Q8_0:
        return QT_Q8_0;
    case CEPE_QTYPE_Q4_K:
        return QT_Q4_K;
    case CEPE_QTYPE_Q5_K:
        return QT_Q5_K;
    case CEPE_QTYPE_Q6_K:
        return QT_Q6_K;
    }
    return -1;
}

cepe_status cepe_qtensor_check(const cepe_qtensor *w) {
    if (!w) return cepe_fail(CEPE_ERR_INVALID_ARG, "weight: NULL tensor");
    const type_info *t = find_type((int)w->type);
    if (!t) return cepe_fail(CEPE_ERR_INVALID_ARG, "weight: unknown type id %d", (int)w->type);
    if (w->n_out <= 0 || w->n_in <= 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "weight: shape [%d, %d] must be positive", w->n_out, w->n_in);
    if (w->n_in % t->block)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "weight: %d values per row of %s: not a multiple of its %d-value block", w->n_in,
                         t->name, t->block);
    if (!w->data) return cepe_fail(CEPE_ERR_INVALID_ARG, "weight: NULL data");
    const size_t row = cepe_qtype_row_bytes((int)w->type, w->n_in);
    if (w->row_stride < row)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "weight: row stride %zu bytes < %zu bytes of a %s row of %d",
                         w->row_stride, row, t->name, w->n_in);
    if ((uintptr_t)w->data % (uintptr_t)t->align || w->row_stride % (size_t)t->align)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "weight: %s data and row stride must be %d-byte aligned",
                         t->name, t->align);
    return CEPE_OK;
}

/* ------------------------------------------------------------ activations */

/* Round to nearest (even) for |v| < 2^22: add 1.5 * 2^23 and read the low
 * mantissa bits back. Branch-free, so the loops vectorize. */
static inline int nearest_int(float v) {
    const float f = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int clamp127(int q) { return q < -127 ? -127 : q > 127 ? 127 : q; }

/* x[n] -> the act_q8_32 layout at act (n a multiple of 32; act 4-byte aligned). */
static void quantize_q8_32(const float *x, void *act, int64_t n) {
    const int64_t nb = n / QK32;
    int8_t *qs = act;
    float *d_out = (float *)(qs + n), *s_out = d_out + nb;
    int32_t *sum_out = (int32_t *)(s_out + nb);
    for (int64_t b = 0; b < nb; b++, x += QK32, qs += QK32) {
        float amax = 0.0f;
        int finite = 1;
        for (int j = 0; j < QK32; j++) {
            const float a = fabsf(x[j]);
            finite &= a <= FLT_MAX; /* false for inf and NaN */
            amax = a > amax ? a : amax;
        }
        int sum = 0;
        float d = 0.0f;
        if (!finite || amax < FLT_MIN) {
            /* non-finite: the products come out NaN, as in fp32; all below the
             * smallest normal float: zeros (an error below 2^-126 a value) */
            d = finite ? 0.0f : NAN;
            memset(qs, 0, QK32);
        } else {
            d = amax / 127.0f;
            const float id = 1.0f / d;
            if (id <= FLT_MAX) {
                for (int j = 0; j < QK32; j++) {
                    const int q = clamp127(nearest_int(x[j] * id));
                    qs[j] = (int8_t)q;
                    sum += q;
                }
            } else { /* a subnormal scale, whose inverse overflows: divide by the same d */
                for (int j = 0; j < QK32; j++) {
                    const int q = clamp127(nearest_int(x[j] / d));
                    qs[j] = (int8_t)q;
                    sum += q;
                }
            }
        }
        d_out[b] = d;
        s_out[b] = d * (float)sum;
        sum_out[b] = sum;
    }
}

static void quantize_q8_K(const float *x, act_q8_K *y, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        int finite = 1;
        for (int j = 0; j < QK_K; j++) {
            const float a = fabsf(x[j]);
            finite &= a <= FLT_MAX;
            if (a > amax) {
                amax = a;
                max = x[j];
            }
        }
        memset(y[b].bsums, 0, sizeof y[b].bsums);
        if (!finite || amax < FLT_MIN) { /* as in quantize_q8_32 */
            y[b].d = finite ? 0.0f : NAN;
            memset(y[b].qs, 0, QK_K);
            continue;
        }
        /* the value of largest magnitude maps to -127, as in ggml */
        const float iscale = -127.0f / max;
        if (fabsf(iscale) <= FLT_MAX) {
            for (int j = 0; j < QK_K; j++) y[b].qs[j] = (int8_t)clamp127(nearest_int(iscale * x[j]));
            y[b].d = 1.0f / iscale;
        } else { /* max below 2^-121: iscale overflows; divide by the scale kept */
            const float d = -max / 127.0f;
            for (int j = 0; j < QK_K; j++) y[b].qs[j] = (int8_t)clamp127(nearest_int(x[j] / d));
            y[b].d = d;
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[b].qs[16 * j + l];
            y[b].bsums[j] = (int16_t)sum;
        }
    }
}

static void convert_bf16(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = quant_fp32_to_bf16(x[i]);
}

size_t quant_act_bytes(act_kind kind, int64_t n) {
    switch (kind) {
    case ACT_F32:
        return (size_t)n * sizeof(float);
    case ACT_Q8_32:
        return (size_t)(n / QK32) * ACT_Q8_32_BYTES_PER_BLOCK;
    case ACT_Q8_K:
        return (size_t)(n / QK_K) * sizeof(act_q8_K);
    case ACT_BF16:
        return (size_t)n * sizeof(uint16_t);
    }
    return 0;
}

void quant_prepare_act(act_kind kind, const float *x, void *act, int64_t n) {
    switch (kind) {
    case ACT_F32:
        memcpy(act, x, (size_t)n * sizeof(float));
        break;
    case ACT_Q8_32:
        quantize_q8_32(x, act, n);
        break;
    case ACT_Q8_K:
        quantize_q8_K(x, act, n / QK_K);
        break;
    case ACT_BF16:
        convert_bf16(x, act, n);
        break;
    }
}

/* ------------------------------------------------------------ instruction sets */

static quant_kernel kernels[3][QT_COUNT];
static cepe_isa isa_best_ = CEPE_ISA_C;
static cepe_isa isa_now = CEPE_ISA_C;
static pthread_once_t isa_once = PTHREAD_ONCE_INIT;

static cepe_isa detect_isa(int *has_bf16) {
    *has_bf16 = 0;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    /* __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers */
    const int avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    *has_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    return avx512 ? CEPE_ISA_AVX512 : avx2 ? CEPE_ISA_AVX2 : CEPE_ISA_C;
#else
    return CEPE_ISA_C;
#endif
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
/* AMD family 19h with AVX-512: Zen 4 (Zen 3, the same family, has none). */
static int amd_zen4(void) {
    unsigned a, b, c, d;
    if (!__builtin_cpu_is("amd") || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned family = ((a >> 8) & 0xF) + (((a >> 8) & 0xF) == 0xF ? (a >> 20) & 0xFF : 0);
    return family == 0x19;
}
#endif

/* Each table starts as a copy of the one below, so a path that has no kernel
 * of its own for a format runs the next best one. */
static void isa_init(void) {
    int has_bf16;
    isa_best_ = detect_isa(&has_bf16);
    quant_kernels_c(kernels[CEPE_ISA_C]);
    memcpy(kernels[CEPE_ISA_AVX2], kernels[CEPE_ISA_C], sizeof kernels[0]);
    memcpy(kernels[CEPE_ISA_AVX512], kernels[CEPE_ISA_C], sizeof kernels[0]);
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (isa_best_ >= CEPE_ISA_AVX2) {
        quant_kernels_avx2(kernels[CEPE_ISA_AVX2]);
        memcpy(kernels[CEPE_ISA_AVX512], kernels[CEPE_ISA_AVX2], sizeof kernels[0]);
    }
    if (isa_best_ >= CEPE_ISA_AVX512) {
        quant_kernels_avx512(kernels[CEPE_ISA_AVX512], has_bf16);
        /* On AMD Zen 4 the AVX2 F32 and F16 kernels read weights from memory
         * faster than the AVX-512 ones: decoding the default model runs
         * 1.15-1.3x faster with them (benchmarks/README.md, bench_llamacpp),
         * while on Intel CPUs with AVX-512 the AVX-512 ones are faster. */
        if (amd_zen4()) {
            kernels[CEPE_ISA_AVX512][QT_F32] = kernels[CEPE_ISA_AVX2][QT_F32];
            kernels[CEPE_ISA_AVX512][QT_F16] = kernels[CEPE_ISA_AVX2][QT_F16];
        }
    }
#endif
    isa_now = isa_best_;
    const char *env = getenv("CEPE_ISA");
    if (env && *env) {
        cepe_isa want = isa_best_;
        if (!strcmp(env, "c"))
            want = CEPE_ISA_C;
        else if (!strcmp(env, "avx2"))
            want = CEPE_ISA_AVX2;
        else if (!strcmp(env, "avx512"))
            want = CEPE_ISA_AVX512;
        isa_now = want < isa_best_ ? want : isa_best_;
    }
}

cepe_isa cepe_quant_isa(void) {
    pthread_once(&isa_once, isa_init);
    return isa_now;
}

cepe_isa cepe_quant_isa_best(void) {
    pthread_once(&isa_once, isa_init);
    return isa_best_;
}

const char *cepe_isa_name(int isa) {
    switch (isa) {
    case CEPE_ISA_C:
        return "c";
    case CEPE_ISA_AVX2:
        return "avx2";
    case CEPE_ISA_AVX512:
        return "avx512";
    }
    return NULL;
}

cepe_status cepe_quant_set_isa(int isa) {
    pthread_once(&isa_once, isa_init);
    if (!cepe_isa_name(isa)) return cepe_fail(CEPE_ERR_INVALID_ARG, "instruction set: unknown id %d", isa);
    if (isa > (int)isa_best_)
        return cepe_fail(CEPE_ERR_UNSUPPORTED, "instruction set %s: this CPU supports up to %s",
                         cepe_isa_name(isa), cepe_isa_name(isa_best_));
    isa_now = (cepe_isa)isa;
    return CEPE_OK;
}

quant_kernel quant_kernel_for(int type) {
    pthread_once(&isa_once, isa_init);
    return kernels[isa_now][type == CEPE_QTYPE_F32 ? QT_F32 : quant_type_index(type)];
}

/* ------------------------------------------------------------ rows */

static cepe_status check_row_type(const char *what, int type, int64_t n) {
    if (quant_type_index(type) < 0)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "%s: type %s has no quantized kernel", what,
                         cepe_qtype_name(type) ? cepe_qtype_name(type) : "(unknown)");
    const int bs = cepe_qtype_block_size(type);
    if (n <= 0 || n % bs)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "%s: %lld values of %s: not a positive multiple of its %d-value block", what,
                         (long long)n, cepe_qtype_name(type), bs);
    return CEPE_OK;
}

size_t cepe_act_row_bytes(int type, int64_t n) {
    if (quant_type_index(type) < 0 || n <= 0 || n % cepe_qtype_block_size(type)) return 0;
    return quant_act_bytes(quant_kernel_for(type).act, n);
}

cepe_status cepe_quantize_activations(int type, const float *x, void *act, int64_t n) {
    const cepe_status st = check_row_type("quantize activations", type, n);
    if (st != CEPE_OK) return st;
    if (!x || !act) return cepe_fail(CEPE_ERR_INVALID_ARG, "quantize activations: NULL pointer");
    if ((uintptr_t)act % 4)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "quantize activations: the output must be 4-byte aligned");
    quant_prepare_act(quant_kernel_for(type).act, x, act, n);
    return CEPE_OK;
}

cepe_status cepe_vec_dot(int type, int64_t n, const void *row, const void *act, float *out) {
    const cepe_status st = check_row_type("vec_dot", type, n);
    if (st != CEPE_OK) return st;
    if (n > INT32_MAX)
        return cepe_fail(CEPE_ERR_INVALID_ARG, "vec_dot: %lld values per row is too many", (long long)n);
    if (!row || !act || !out) return cepe_fail(CEPE_ERR_INVALID_ARG, "vec_dot: NULL pointer");
    if ((uintptr_t)row % 2 || (uintptr_t)act % 4)
        return cepe_fail(CEPE_ERR_INVALID_ARG,
                         "vec_dot: the row must be 2-byte and the activations 4-byte aligned");
    *out = quant_kernel_for(type).dot((int)n, row, act);
    return CEPE_OK;
}
