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
    cudaStream_t stream;  // every op, copy and memset of this backend runs here, in order
    cublasHandle_t blas;  // bound to `stream`
    int smem_optin;       // the most dynamic shared memory a block may opt in to, bytes
    int sm_count;         // multiprocessors: how many blocks fill the device
    unsigned *dev_flags;  // CUDA_FLAG_*, set by kernels, collected by sync
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
static inline int cuda_launched(cuda_state *st, const char *what) {
    return cuda_check(st, cudaGetLastError(), what);
}

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
// One per entry of csrc/backend.h's op list, with its signature: cuda_<op>,
// defined in the kernels/*.cu file of its family (cuda_elementwise.cu:
// embedding, swiglu, to_bf16; cuda_rope.cu; cuda_rmsnorm.cu; cuda_matmul.cu;
// cuda_attention.cu; cuda_attention_backward.cu; cuda_loss.cu; cuda_optim.cu).
// Each returns 0 or the recorded CEPE_ERR_*.
#define CUDA_OP_DECL(name, params, args) int cuda_##name(const cepe_backend *be, CEPE_UNPACK params);
CEPE_BACKEND_OPS(CUDA_OP_DECL)
#undef CUDA_OP_DECL

// the shape checks both attention files apply; 0 or the recorded error
int cuda_attention_check(cuda_state *st, const attention_shape *s, const char *what);

#endif // CEPE_CUDA_COMMON_CUH
