/* error.c — thread-local last-error message and checked allocation. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

static _Thread_local char last_error[512];

const char *cepe_last_error(void) { return last_error; }

cepe_status cepe_fail(cepe_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

const char *cepe_status_name(cepe_status s) {
    switch (s) {
    case CEPE_OK: return "ok";
    case CEPE_ERR_INVALID_ARG: return "invalid argument";
    case CEPE_ERR_OUT_OF_MEMORY: return "out of memory";
    case CEPE_ERR_MISSING_WEIGHT: return "missing weight";
    case CEPE_ERR_UNSUPPORTED: return "unsupported";
    case CEPE_ERR_STATE: return "invalid state";
    case CEPE_ERR_INTERRUPTED: return "interrupted";
    case CEPE_ERR_BACKEND: return "backend failure";
    }
    return "unknown status";
}

void *cepe_calloc(size_t count, size_t size) {
    size_t bytes = cepe_mul_size(count, size);
    if (bytes == SIZE_MAX) return NULL;
    if (bytes == 0) bytes = 64;
    bytes = (bytes + 63) & ~(size_t)63; /* aligned_alloc wants a multiple */
    void *p = aligned_alloc(64, bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

void cepe_free(void *p) { free(p); }
