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
    case CEPE_OK:
        return "ok";
    case CEPE_ERR_INVALID_ARG:
        return "invalid argument";
    case CEPE_ERR_OUT_OF_MEMORY:
        return "out of memory";
    case CEPE_ERR_MISSING_WEIGHT:
        return "missing weight";
    case CEPE_ERR_UNSUPPORTED:
        return "unsupported";
    case CEPE_ERR_STATE:
        return "invalid state";
    case CEPE_ERR_INTERRUPTED:
        return "interrupted";
    case CEPE_ERR_BACKEND:
        return "backend failure";
    case CEPE_ERR_NUMERIC:
        return "numeric overflow";
    }
    return "unknown status";
}

void *cepe_calloc(size_t count, size_t size) {
    /* calloc, not malloc + memset: large blocks come zeroed from mmap and are
     * only backed by RAM when touched, so an oversized KV cache request fails
     * here (MemoryError) or costs nothing until used. */
    if (cepe_mul_size(count, size) == SIZE_MAX) return NULL;
    return calloc(count ? count : 1, size ? size : 1);
}

void cepe_free(void *p) { free(p); }
