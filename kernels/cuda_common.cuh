// cuda_common.cuh — what the kernels/*.cu files of the CUDA backend share:
// the backend's private state, error recording, launch sizing, warp and
// block reductions, and the prototypes of the ops cuda_backend.cu puts into
// the table (csrc/backend.h documents each op; the CPU reference of each is
// in csrc/ops/, and the per-element math both use is in the CEPE_HD headers).
#ifndef CEPE_CUDA_COMMON_CUH
#define CEPE_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>

#include "backend.h"
#include "cepe.h"

// Bits a kernel sets in cuda_state::dev_flags when it meets a value that only
// the device can see and the caller should have range-checked; the kernel
// skips the bad row and the next sync reports it.
enum {
    CUDA_FLAG_TARGET = 1u,  // cross-entropy target outside [0, V), not the ignore index
    CUDA_FLAG_TEACHER = 2u, // kl_topk teacher index outside [0, V)
};

struct cuda_state {
    int device;
    cudaStream_t stream; // every op, copy and memset of this backend runs here, in order
    cublasHandle_t blas; // bound to `stream`
    int smem_optin;      // the most dynamic shared memory a block may opt in to, bytes
    int sm_count;        // multiprocessors: how many blocks fill the device
    unsigned *dev_flags; // CUDA_FLAG_*, set by kernels, collected by sync
    unsigned *host_flags; // pinned: where sync copies dev_flags

    // caching allocator (cuda_arena.cu); blocks are reused in stream order
    std::mutex mem_lock;                     // guards the allocator and the staging buffer
    std::multimap<size_t, void *> cached;    // free blocks by size
    std::unordered_map<void *, size_t> live; // blocks handed out, with their size
    size_t cached_bytes;

    // uploads go through this pinned buffer (cuda_backend.cu) so the caller
    // may free its host copy as soon as upload returns, without a stream sync
    void *staging;
    size_t staging_bytes;
    cudaEvent_t staging_free; // recorded after the last copy out of staging

    // the first failure since the last sync
    std::mutex err_lock;
    int status; // CEPE_ERR_*, 0 = none
    char msg[512];
};

static inline cuda_state *cuda_st(const cepe_backend *be) { return static_cast<cuda_state *>(be->state); }

// ---------------------------------------------------------------- errors
// (cuda_backend.cu) Each records the failure if it is the first since the
// last sync, and returns its CEPE_ERR_* code (0 when there is none).

int cuda_fail(cuda_state *st, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
int cuda_check(cuda_state *st, cudaError_t err, const char *what);
int cublas_check(cuda_state *st, cublasStatus_t status, const char *what);
// After a launch: a bad configuration shows up here, a fault in the kernel
// only at the next sync.
static inline int cuda_launched(cuda_state *st, const char *what) { return cuda_check(st, cudaGetLastError(), what); }

// The backend's state with its device current on the calling host thread;
// NULL (the failure recorded) if the device cannot be selected.
cuda_state *cuda_begin(const cepe_backend *be);

// ------------------------------------------------------------- allocator
// (cuda_arena.cu) Uninitialised device memory from the cache or cudaMalloc;
// NULL with *err set on failure. Free returns the block to the cache and
// -1 for a pointer the arena did not hand out.
void *cuda_arena_alloc(cuda_state *st, size_t bytes, cudaError_t *err);
int cuda_arena_free(cuda_state *st, void *p);
void cuda_arena_destroy(cuda_state *st); // cudaFree of every block, live or cached

// Op scratch (a few per call): from the arena, the failure recorded; freed
// back at once after the launches that use it (stream order keeps it alive).
void *cuda_scratch(cuda_state *st, size_t bytes, const char *what);
static inline void cuda_scratch_free(cuda_state *st, void *p) {
    if (p) cuda_arena_free(st, p);
}

// ---------------------------------------------------------------- launches

#define CUDA_FULL_MASK 0xffffffffu
#define CUDA_THREADS 256 // elementwise and row kernels

// Blocks for n items at `threads` per block, capped: kernels loop with a grid
// stride, so any n (size_t) is covered.
static inline unsigned cuda_blocks(size_t n, int threads) {
    const size_t b = (n + (size_t)threads - 1) / (size_t)threads;
    return (unsigned)(b < 1 ? 1 : b > 65536 ? 65536 : b);
}

// Batch rows per launch: gridDim.y and gridDim.z stop at 65535.
#define CUDA_MAX_GRID_YZ 65535

#ifdef __CUDACC__
// Grid-stride loops: for (size_t i = grid_index(); i < n; i += grid_stride())
__device__ __forceinline__ size_t grid_index() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(CUDA_FULL_MASK, x, o);
    return x;
}
__device__ __forceinline__ double warp_sum(double x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(CUDA_FULL_MASK, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(CUDA_FULL_MASK, x, o));
    return x;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the
// same value, added in the same order on every run. `shared` holds 32 T.
template <typename T> __device__ T block_sum(T x, T *shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads(); // a previous call may still be reading `shared`
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < nwarps ? shared[lane] : T(0);
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float *shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < nwarps ? shared[lane] : -INFINITY;
    return warp_max(x);
}
#endif // __CUDACC__

// ------------------------------------------------------------------- ops
// Signatures as in csrc/backend.h; each returns 0 or the recorded CEPE_ERR_*.

// cuda_elementwise.cu
int cuda_embedding(const cepe_backend *be, float *out, const int32_t *ids, const float *wte, int N, int C);
int cuda_embedding_backward(const cepe_backend *be, float *dwte, const float *dout, const int32_t *ids, int N, int C);
int cuda_swiglu(const cepe_backend *be, float *out, const float *gate, const float *up, long N, int nt);
int cuda_swiglu_backward(const cepe_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                         const float *up, long N);
int cuda_to_bf16(const cepe_backend *be, uint16_t *dst, const float *src, size_t n);
// cuda_rope.cu
int cuda_rope_table(const cepe_backend *be, float *cos_t, float *sin_t, const double *pos, const float *inv_freq, int N,
                    int half, float mscale);
int cuda_rope(const cepe_backend *be, float *x, const float *cos_t, const float *sin_t, int N, int nh, int hd, int half,
              int interleaved, int nt);
int cuda_rope_backward(const cepe_backend *be, float *dx, const float *cos_t, const float *sin_t, int N, int nh, int hd,
                       int half, int interleaved);
// cuda_rmsnorm.cu
int cuda_rmsnorm(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C, float eps, int nt);
int cuda_rmsnorm_backward(const cepe_backend *be, float *dinp, float *dweight, const float *dout, const float *inp,
                          const float *weight, int N, int C, float eps);
// cuda_matmul.cu
int cuda_matmul(const cepe_backend *be, float *out, const float *inp, const float *w, int N, int C, int OC,
                int accumulate, int nt);
int cuda_matmul_backward(const cepe_backend *be, float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, int N, int C, int OC, int accumulate, int nt);
int cuda_matmul_bf16(const cepe_backend *be, float *out, const float *inp, const uint16_t *w, int N, int C, int OC,
                     int accumulate, int nt);
// cuda_attention.cu
int cuda_attention(const cepe_backend *be, float *out, const float *q, const float *k, const float *v,
                   const uint8_t *key_valid, const attention_shape *s, int nt);
int cuda_attention_lse(const cepe_backend *be, float *out, float *lse, const float *q, const float *k, const float *v,
                       const uint8_t *key_valid, const attention_shape *s, int nt);
// the shape checks both attention files apply; 0 or the recorded error
int cuda_attention_check(cuda_state *st, const attention_shape *s, const char *what);
// cuda_attention_backward.cu
int cuda_attention_backward(const cepe_backend *be, float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const float *out, const float *lse,
                            const uint8_t *key_valid, const attention_shape *s, int nt);
// cuda_loss.cu
int cuda_cross_entropy(const cepe_backend *be, float *losses, float *dlogits, const float *logits,
                       const int32_t *targets, int N, int V, float dloss_scale);
int cuda_kl_topk(const cepe_backend *be, float *losses, float *dlogits, const float *logits, const uint16_t *probs,
                 const int32_t *index, int N, int V, int K, int mode, float delta, float dloss_scale);
// cuda_optim.cu
int cuda_sumsq_chunks(const cepe_backend *be, double *partial, const float *g, size_t n, int nt);
int cuda_scale(const cepe_backend *be, float *x, float s, size_t n, int nt);
int cuda_adamw(const cepe_backend *be, float *p, const float *g, float *m, float *v, size_t n, float decay, float w1,
               float b2, float w2, float bc2_sqrt, float neg_step, float eps, int nt);

#endif // CEPE_CUDA_COMMON_CUH
