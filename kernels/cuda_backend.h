/* cuda_backend.h — C entry of the CUDA backend (the kernels/ files, built into the
 * optional cepe_cuda extension): an op table of csrc/backend.h whose ops run
 * on one CUDA stream of one device, with GEMMs through cuBLAS. */
#ifndef CEPE_CUDA_BACKEND_H
#define CEPE_CUDA_BACKEND_H

#include <stddef.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A new backend instance on `device` (its own stream, cuBLAS handle and
 * memory cache); free it with its destroy. NULL, with the reason in msg, when
 * there is no driver, no such device, or no memory for its state. */
cepe_backend *cepe_cuda_backend_create(int device, char *msg, size_t msg_len);

#ifdef __cplusplus
}
#endif

#endif /* CEPE_CUDA_BACKEND_H */
