// cuda_backend.cu — the CUDA backend instance: its state (one stream, one
// cuBLAS handle, the memory cache, the first error since the last sync), the
// memory ops of the table, sync, and the table itself. The math lives in the
// other kernels/*.cu files, one op family each.
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <new>

#include "cuda_backend.h"
#include "cuda_common.cuh"

// Uploads up to this size are staged through pinned memory (see upload).
#define STAGING_BYTES ((size_t)4 << 20)

// ------------------------------------------------------------------ errors

int cuda_fail(cuda_state *st, int code, const char *fmt, ...) {
    std::lock_guard<std::mutex> guard(st->err_lock);
    if (st->status == 0) { // the first failure wins: later ones are usually its echoes
        st->status = code;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(st->msg, sizeof st->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int cuda_code(cudaError_t err) {
    return err == cudaErrorMemoryAllocation ? CEPE_ERR_OUT_OF_MEMORY : CEPE_ERR_BACKEND;
}

int cuda_check(cuda_state *st, cudaError_t err, const char *what) {
    if (err == cudaSuccess) return 0;
    // The runtime also keeps a failed call's error as the thread's last error:
    // consume it, or the next cuda_launched (cudaGetLastError) would blame an
    // innocent launch for it after this failure was already reported.
    cudaGetLastError();
    return cuda_fail(st, cuda_code(err), "CUDA error in %s: %s (%s)", what, cudaGetErrorString(err),
                     cudaGetErrorName(err));
}

int cublas_check(cuda_state *st, cublasStatus_t status, const char *what) {
    if (status == CUBLAS_STATUS_SUCCESS) return 0;
    return cuda_fail(st, status == CUBLAS_STATUS_ALLOC_FAILED ? CEPE_ERR_OUT_OF_MEMORY : CEPE_ERR_BACKEND,
                     "cuBLAS error in %s: %s (%s)", what, cublasGetStatusString(status),
                     cublasGetStatusName(status));
}

cuda_state *cuda_begin(const cepe_backend *be) {
    cuda_state *st = cuda_st(be);
    if (cuda_check(st, cudaSetDevice(st->device), "cudaSetDevice")) return nullptr;
    return st;
}

// ------------------------------------------------------------------ memory

static void *cuda_alloc(const cepe_backend *be, size_t bytes) {
    cuda_state *st = cuda_begin(be);
    if (!st) return nullptr;
    cudaError_t err;
    void *p = cuda_arena_alloc(st, bytes ? bytes : 1, &err);
    if (!p) { // out of memory is the caller's to report (NULL); anything else is a fault
        if (err != cudaErrorMemoryAllocation) cuda_check(st, err, "alloc");
        return nullptr;
    }
    if (cuda_check(st, cudaMemsetAsync(p, 0, bytes, st->stream), "alloc (zero fill)")) {
        cuda_arena_free(st, p);
        return nullptr;
    }
    return p;
}

static void cuda_free_block(const cepe_backend *be, void *p) {
    if (!p) return;
    cuda_state *st = cuda_begin(be);
    if (st && cuda_arena_free(st, p) != 0)
        cuda_fail(st, CEPE_ERR_INVALID_ARG, "free: %p was not allocated by this CUDA backend", p);
}

// The caller may free host_src as soon as this returns. Small uploads (the
// per-token ids, positions, masks) are copied into the pinned staging buffer
// and queued from there: they wait only until the previous staged copy has
// run (and what was queued before it), not for the kernels queued since.
// Large ones (the weights, once) are queued from the caller's memory and
// waited for.
static int cuda_upload(const cepe_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (bytes == 0) return 0;
    if (st->staging && bytes <= st->staging_bytes) {
        std::lock_guard<std::mutex> guard(st->mem_lock);
        int rc = cuda_check(st, cudaEventSynchronize(st->staging_free), "upload (staging wait)");
        if (rc) return rc;
        memcpy(st->staging, src, bytes);
        rc = cuda_check(st, cudaMemcpyAsync(dst, st->staging, bytes, cudaMemcpyHostToDevice, st->stream),
                        "upload");
        if (rc) return rc;
        return cuda_check(st, cudaEventRecord(st->staging_free, st->stream), "upload (staging record)");
    }
    int rc = cuda_check(st, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, st->stream), "upload");
    if (rc) return rc;
    return cuda_check(st, cudaStreamSynchronize(st->stream), "upload (wait)");
}

static int cuda_download(const cepe_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (bytes == 0) return 0;
    int rc = cuda_check(st, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st->stream), "download");
    if (rc) return rc;
    return cuda_check(st, cudaStreamSynchronize(st->stream), "download (wait)");
}

static int cuda_copy(const cepe_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (bytes == 0) return 0;
    return cuda_check(st, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st->stream), "copy");
}

static int cuda_fill(const cepe_backend *be, void *dst, int byte, size_t bytes) {
    cuda_state *st = cuda_begin(be);
    if (!st) return CEPE_ERR_BACKEND;
    if (bytes == 0) return 0;
    return cuda_check(st, cudaMemsetAsync(dst, byte, bytes, st->stream), "fill");
}

// Waits for the stream, collects the kernels' flags, and hands over (and
// clears) the first failure since the last sync.
static int cuda_sync(const cepe_backend *be, char *msg, size_t msg_len) {
    cuda_state *st = cuda_begin(be);
    if (st) {
        // queued behind every kernel: the flags they set, then a fresh word
        if (cuda_check(st,
                       cudaMemcpyAsync(st->host_flags, st->dev_flags, sizeof(unsigned),
                                       cudaMemcpyDeviceToHost, st->stream),
                       "sync (flags)") == 0 &&
            cuda_check(st, cudaMemsetAsync(st->dev_flags, 0, sizeof(unsigned), st->stream), "sync (flags)") ==
                0 &&
            cuda_check(st, cudaStreamSynchronize(st->stream), "sync") == 0) {
            const unsigned flags = *st->host_flags;
            if (flags & CUDA_FLAG_TARGET)
                cuda_fail(st, CEPE_ERR_INVALID_ARG,
                          "cross-entropy: a target is outside [0, V) (rows skipped)");
            if (flags & CUDA_FLAG_TEACHER)
                cuda_fail(st, CEPE_ERR_INVALID_ARG,
                          "distillation KL: a teacher index is outside [0, V) (rows skipped)");
        }
    } else {
        st = cuda_st(be);
    }
    std::lock_guard<std::mutex> guard(st->err_lock);
    const int status = st->status;
    if (msg && msg_len) snprintf(msg, msg_len, "%s", status ? st->msg : "");
    st->status = 0;
    st->msg[0] = 0;
    return status;
}

// ------------------------------------------------------- create / destroy

static void cuda_destroy(cepe_backend *be) {
    if (!be) return;
    cuda_state *st = cuda_st(be);
    // At interpreter exit the CUDA runtime may be gone before the capsule
    // holding us: then the process's memory goes with it, and only the host
    // side is freed here.
    if (st && cudaSetDevice(st->device) == cudaSuccess) {
        if (st->stream) cudaStreamSynchronize(st->stream);
        cuda_arena_destroy(st);
        if (st->dev_flags) cudaFree(st->dev_flags);
        if (st->host_flags) cudaFreeHost(st->host_flags);
        if (st->staging) cudaFreeHost(st->staging);
        if (st->staging_free) cudaEventDestroy(st->staging_free);
        if (st->blas) cublasDestroy(st->blas);
        if (st->stream) cudaStreamDestroy(st->stream);
    }
    delete st;
    delete be;
}

static void fill_table(cepe_backend *be) {
    be->abi = CEPE_BACKEND_ABI;
    be->name = "cuda";
    be->device = 1;
    be->alloc = cuda_alloc;
    be->free = cuda_free_block;
    be->upload = cuda_upload;
    be->download = cuda_download;
    be->copy = cuda_copy;
    be->fill = cuda_fill;
    be->sync = cuda_sync;
#define CUDA_TABLE_OP(name, params, args) be->name = cuda_##name;
    CEPE_BACKEND_OPS(CUDA_TABLE_OP)
#undef CUDA_TABLE_OP
    be->destroy = cuda_destroy;
}

extern "C" cepe_backend *cepe_cuda_backend_create(int device, char *msg, size_t msg_len) {
    char dummy[8];
    if (!msg || !msg_len) {
        msg = dummy;
        msg_len = sizeof dummy;
    }
    msg[0] = 0;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaGetLastError();
        snprintf(msg, msg_len, "no usable CUDA driver: %s (%s)", cudaGetErrorString(err),
                 cudaGetErrorName(err));
        return nullptr;
    }
    if (device < 0 || device >= count) {
        snprintf(msg, msg_len, "no CUDA device %d (%d found)", device, count);
        return nullptr;
    }
    cepe_backend *be = new (std::nothrow) cepe_backend();
    cuda_state *st = be ? new (std::nothrow) cuda_state() : nullptr;
    if (!st) {
        delete be;
        snprintf(msg, msg_len, "out of host memory creating the CUDA backend");
        return nullptr;
    }
    be->state = st;
    be->destroy = cuda_destroy;
    st->device = device;

    const char *what = "cudaSetDevice";
    cublasStatus_t bs = CUBLAS_STATUS_SUCCESS;
    if ((err = cudaSetDevice(device)) != cudaSuccess) goto cuda_failed;
    what = "cudaStreamCreate";
    if ((err = cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking)) != cudaSuccess)
        goto cuda_failed;
    what = "cudaDeviceGetAttribute";
    if ((err = cudaDeviceGetAttribute(&st->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) !=
        cudaSuccess)
        goto cuda_failed;
    if ((err = cudaDeviceGetAttribute(&st->sm_count, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
        goto cuda_failed;
    what = "cudaMalloc";
    if ((err = cudaMalloc(&st->dev_flags, sizeof(unsigned))) != cudaSuccess) goto cuda_failed;
    // on our stream: cudaMemset would go to the legacy stream, which a
    // non-blocking stream does not wait for, racing the first kernels and sync
    if ((err = cudaMemsetAsync(st->dev_flags, 0, sizeof(unsigned), st->stream)) != cudaSuccess)
        goto cuda_failed;
    what = "cudaMallocHost";
    if ((err = cudaMallocHost(&st->host_flags, sizeof(unsigned))) != cudaSuccess) goto cuda_failed;
    what = "cudaEventCreate";
    if ((err = cudaEventCreateWithFlags(&st->staging_free, cudaEventDisableTiming)) != cudaSuccess)
        goto cuda_failed;
    // Without pinned staging, uploads are simply synchronous.
    if (cudaMallocHost(&st->staging, STAGING_BYTES) == cudaSuccess)
        st->staging_bytes = STAGING_BYTES;
    else {
        cudaGetLastError();
        st->staging = nullptr;
    }
    if ((bs = cublasCreate(&st->blas)) != CUBLAS_STATUS_SUCCESS) goto blas_failed;
    if ((bs = cublasSetStream(st->blas, st->stream)) != CUBLAS_STATUS_SUCCESS) goto blas_failed;
    // fp32 GEMMs stay fp32 (no TF32): CPU parity to 1e-5 needs it. The bf16
    // GEMM asks for tensor cores through its own compute type.
    if ((bs = cublasSetMathMode(st->blas, CUBLAS_DEFAULT_MATH)) != CUBLAS_STATUS_SUCCESS) goto blas_failed;
    fill_table(be);
    return be;

cuda_failed:
    cudaGetLastError();
    snprintf(msg, msg_len, "CUDA device %d: %s failed: %s (%s)", device, what, cudaGetErrorString(err),
             cudaGetErrorName(err));
    cuda_destroy(be);
    return nullptr;
blas_failed:
    snprintf(msg, msg_len, "CUDA device %d: cuBLAS setup failed: %s", device, cublasGetStatusString(bs));
    cuda_destroy(be);
    return nullptr;
}
