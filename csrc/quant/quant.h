/* quant.h — weights kept in their stored format (GGUF/ggml blocks) and
 * multiplied natively on the CPU.
 *
 * A weight matrix is a cepe_qtensor: n_out rows of n_in values, each row the
 * bytes the file stores (ggml's block layouts, below), rows row_stride bytes
 * apart. Nothing is widened at load: a Q4_1 matrix stays 5 bits a weight in
 * memory (memory-mapped where the file allows), and decoding, which streams
 * every weight once per token, reads 6x fewer bytes than from fp32.
 *
 * How the model will use it:
 *   - The weights struct (model/model.h) holds a cepe_qtensor where it holds
 *     a `const float *` today (`wq`, `wk`, `wv`, `wo`, `w_gate`, `w_up`,
 *     `w_down`, the cross-attention's, `lm_head`; `embed` too), filled by
 *     cepe_model_bind from the bytes the reader hands over with their GGML type
 *     id (cepe_qtype uses the same numbers). F32 weights are cepe_qtensors of
 *     type CEPE_QTYPE_F32, so model code has one kind of weight and never
 *     branches on formats.
 *   - The backend's matmul op takes the cepe_qtensor; the CPU backend calls
 *     cepe_qmatmul, which sends F32 to the BLAS path of ops/matmul.c and every
 *     other type to the kernels here, chosen by type and by the CPU's
 *     instruction set (picked once at run time, see cepe_quant_isa). Its
 *     scratch (quantized activations, dequantized tiles) is one buffer of
 *     cepe_qmatmul_work_size bytes in the RunState, sized at creation for the
 *     largest weight and batch, so the per-token loop allocates nothing.
 *   - Training keeps fp32 trainable weights (the AdamW update needs them);
 *     frozen quantized weights go through the same cepe_qmatmul forward and
 *     their input gradient through a dequantized tile (a later step).
 *   - Embedding rows are gathered with cepe_dequantize_row.
 *
 * Arithmetic, as ggml does it: for Q4_0, Q4_1 and Q8_0 weights each row of
 * activations is quantized to int8 in blocks of 32 (scale = max|x|/127, kept in
 * fp32), for the K-quants in blocks of 256 (Q8_K, with sums per 16); the dot
 * product of a block is exact integer arithmetic and only the per-block scales
 * are float. F16 weights are widened and multiplied with fp32 activations;
 * BF16 likewise, or on CPUs with AVX512-BF16 both sides are bf16 pairs
 * accumulated in fp32 (vdpbf16ps).
 *
 * Every function that can fail returns a cepe_status and sets
 * cepe_last_error(); invalid shapes (n_in not a multiple of the type's block,
 * misaligned data) are refused, never computed wrongly. */
#ifndef CEPE_QUANT_H
#define CEPE_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "../cepe.h"

/* GGML's type ids, so a GGUF tensor's type passes through unchanged. */
typedef enum {
    CEPE_QTYPE_F32 = 0,
    CEPE_QTYPE_F16 = 1,
    CEPE_QTYPE_Q4_0 = 2,
    CEPE_QTYPE_Q4_1 = 3,
    CEPE_QTYPE_Q8_0 = 8,
    CEPE_QTYPE_Q4_K = 12,
    CEPE_QTYPE_Q5_K = 13,
    CEPE_QTYPE_Q6_K = 14,
    CEPE_QTYPE_BF16 = 30,
} cepe_qtype;

/* A weight matrix in its stored format: out = x · Wᵀ with W [n_out, n_in]. */
typedef struct {
    cepe_qtype type;
    int n_out; /* rows (output features) */
    int n_in;  /* values per row (input features): a multiple of the type's block */
    const void
        *data; /* n_out rows, row_stride bytes apart, aligned to the block's alignment (2, or 4 for F32) */
    size_t row_stride; /* bytes from one row to the next, >= cepe_qtype_row_bytes(type, n_in) */
} cepe_qtensor;

/* Instruction-set paths. The best one the CPU supports is chosen on first use;
 * the environment variable CEPE_ISA=c|avx2|avx512 lowers it (a path the CPU
 * lacks is never taken: the best supported one below it is). */
typedef enum {
    CEPE_ISA_C = 0,    /* portable C, any CPU */
    CEPE_ISA_AVX2 = 1, /* AVX2 + FMA + F16C (Haswell, Zen 1 and later) */
    CEPE_ISA_AVX512 =
        2, /* AVX-512 F/BW/VL + VNNI (Ice Lake, Zen 4 and later); BF16 uses AVX512-BF16 where present */
} cepe_isa;

/* ------------------------------------------------------------ formats */

/* The type's name ("Q4_K"), or NULL for a type this build does not handle. */
const char *cepe_qtype_name(int type);
/* Values per block (32, 256; 1 for F32/F16/BF16), 0 for an unknown type. */
int cepe_qtype_block_size(int type);
/* Bytes of one row of n values; 0 when n is not a positive multiple of the
 * block size or the type is unknown. */
size_t cepe_qtype_row_bytes(int type, int64_t n);

/* Checks a cepe_qtensor: known type, positive shape, n_in a multiple of the
 * block, stride and data aligned. CEPE_ERR_INVALID_ARG naming the fault. */
cepe_status cepe_qtensor_check(const cepe_qtensor *w);

/* ------------------------------------------------------------ rows */

/* y[n] = the n values stored in `row` (n a multiple of the block size).
 * Bit-identical to gguf's NumPy dequantization (float32 ops, no FMA). */
cepe_status cepe_dequantize_row(int type, const void *row, float *y, int64_t n);

/* ------------------------------------------------------------ products */

/* The instruction set the kernels use now. */
cepe_isa cepe_quant_isa(void);
/* The best instruction set this CPU supports. */
cepe_isa cepe_quant_isa_best(void);
/* Chooses the path (tests and benchmarks compare them): CEPE_ERR_UNSUPPORTED
 * when the CPU lacks it. Not to be called while products are running. */
cepe_status cepe_quant_set_isa(int isa);
const char *cepe_isa_name(int isa);

/* Bytes of the activation row that a weight of this type multiplies, as
 * cepe_quantize_activations prepares it for the current ISA; 0 for a bad
 * type or length. */
size_t cepe_act_row_bytes(int type, int64_t n);
/* act (4-byte aligned) = x[n] in the form the current ISA's kernel for `type`
 * multiplies: int8 in blocks of 32 (Q4_0, Q4_1, Q8_0; layout in quant_impl.h),
 * ggml's Q8_K blocks of 256 (K-quants), bf16 (BF16 with AVX512-BF16) or an
 * fp32 copy. A non-finite x makes its block's scale NaN, so the products come
 * out NaN as they would in fp32. */
cepe_status cepe_quantize_activations(int type, const float *x, void *act, int64_t n);
/* *out = the dot product of one stored row (n values) and an activation row
 * prepared by cepe_quantize_activations, on the current ISA. */
cepe_status cepe_vec_dot(int type, int64_t n, const void *row, const void *act, float *out);

/* Scratch bytes cepe_qmatmul needs for `rows` rows of activations. */
size_t cepe_qmatmul_work_size(const cepe_qtensor *w, int rows, int n_threads);
/* How cepe_qmatmul multiplies `rows` rows by w on the current ISA. */
typedef enum {
    CEPE_QMATMUL_KERNELS = 0,   /* the quantized dot kernels, one output at a time */
    CEPE_QMATMUL_SGEMM = 1,     /* tiles of w dequantized to fp32, then the BLAS sgemm */
    CEPE_QMATMUL_INT8_GEMM = 2, /* Q4_0/Q4_1/Q8_0 on AVX-512 VNNI: int8 panels, the kernels' activations */
    CEPE_QMATMUL_BF16_GEMM = 3, /* BF16 on AVX512-BF16: activations rounded to bf16, fp32 sums */
} cepe_qmatmul_path_kind;
int cepe_qmatmul_path(const cepe_qtensor *w, int rows);
/* Whether that is the dequantized tiles + sgemm (CEPE_QMATMUL_SGEMM). */
int cepe_qmatmul_uses_sgemm(const cepe_qtensor *w, int rows);
/* Whether that is the bf16 GEMM (CEPE_QMATMUL_BF16_GEMM). */
int cepe_qmatmul_uses_bf16_gemm(const cepe_qtensor *w, int rows);
/* Whether cepe_qmatmul_backward_input takes the bf16 GEMM for w (BF16 weights
 * on the AVX-512 path with AVX512-BF16, any number of rows). */
int cepe_qmatmul_backward_uses_bf16_gemm(const cepe_qtensor *w);
/* The number of rows from which the int8 GEMM is used where it exists, as
 * cepe_qmatmul_sgemm_rows sets the sgemm's (a huge value turns it off). */
int cepe_qmatmul_gemm_rows(int rows);
/* The number of rows from which sgemm (for BF16 on AVX512-BF16: the bf16
 * GEMM) is used, for every format: rows > 0 sets it (benchmarks and tests
 * compare the ways with it), 0 goes back to the measured crossover of each
 * format, rows < 0 only reads. Returns the setting before the call (0: the
 * measured ones). Not to be called while products are running. */
int cepe_qmatmul_sgemm_rows(int rows);

/* out[rows, n_out] (+)= x[rows, n_in] · Wᵀ. accumulate: add to out. work:
 * cepe_qmatmul_work_size bytes, or NULL to let the call allocate its own.
 * Parallel over output rows with n_threads OpenMP threads; the BLAS it calls
 * runs single-threaded inside them. */
cepe_status cepe_qmatmul(float *out, const float *x, const cepe_qtensor *w, int rows, int accumulate,
                         void *work, size_t work_size, int n_threads);

/* dinp[rows, n_in] (+)= dout[rows, n_out] · W: the input gradient of
 * cepe_qmatmul for a frozen W, widened to fp32 a tile of rows at a time and
 * multiplied with the BLAS sgemm (n_threads OpenMP threads over the rows);
 * BF16 where cepe_qmatmul_backward_uses_bf16_gemm says so: dout rounded to
 * bf16 and the bf16 GEMM (threads over the inputs). */
cepe_status cepe_qmatmul_backward_input(float *dinp, const float *dout, const cepe_qtensor *w, int rows,
                                        int accumulate, int n_threads);

#endif /* CEPE_QUANT_H */
