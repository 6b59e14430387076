/* errors.h — shared by the translation units of the cepe_c extension. */
#ifndef CEPE_C_ERRORS_H
#define CEPE_C_ERRORS_H

#include <Python.h>

#include "../csrc/cepe.h"

/* Sets the Python exception for a failed cepe_status (ValueError for
 * CEPE_ERR_INVALID_ARG, ...) with cepe_last_error() as message; returns NULL. */
PyObject *raise_status(cepe_status st);

#endif /* CEPE_C_ERRORS_H */
