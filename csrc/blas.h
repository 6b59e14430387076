/* blas.h — one place that knows which CBLAS we link.
 * CEPE_MKL_BLAS (the default on x86-64 Linux, setup.py): Intel oneMKL from
 *   PyPI (the mkl wheel): its sgemm ran prefill and the attention blocks
 *   10-20 % faster than OpenBLAS here (benchmarks/README.md).
 * Otherwise scipy-openblas32 from PyPI, whose symbols carry a "scipy_" prefix
 *   (so it never clashes with NumPy's or torch's own BLAS in one process).
 * CEPE_SYSTEM_BLAS: a system CBLAS with plain names. */
#ifndef CEPE_BLAS_H
#define CEPE_BLAS_H

#if defined(CEPE_MKL_BLAS)
#include <mkl_cblas.h>
#include <mkl_service.h>
#define CEPE_SGEMM cblas_sgemm
#define CEPE_BLAS_SET_THREADS mkl_set_num_threads
#define CEPE_BLAS_NAME "oneMKL"
#elif defined(CEPE_SYSTEM_BLAS)
#include <cblas.h>
#define CEPE_SGEMM cblas_sgemm
#define CEPE_BLAS_NAME "system CBLAS"
#else
#include <cblas.h> /* scipy_openblas32/include/cblas.h */
#define CEPE_SGEMM scipy_cblas_sgemm
#define CEPE_BLAS_SET_THREADS scipy_openblas_set_num_threads
#define CEPE_BLAS_CONFIG scipy_openblas_get_config
#define CEPE_BLAS_NAME "scipy-openblas32"
#endif

#endif /* CEPE_BLAS_H */
