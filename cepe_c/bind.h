/* errors.h — shared by the translation units of the cepe_c extension. */
#ifndef CEPE_C_ERRORS_H
#define CEPE_C_ERRORS_H

#include <Python.h>

#include "../csrc/cepe.h"

/* Sets the Python exception for a failed cepe_status (ValueError for
 * CEPE_ERR_INVALID_ARG, ...) with cepe_last_error() as message; returns NULL. */
PyObject *raise_status(cepe_status st);

/* rope_bindings.c: a RoPE settings dict (cepe.rope.RopeSettings.to_core())
 * into rc; keep[] receives new references to the arrays rc's longrope
 * factors point into (Py_XDECREF them once rc is no longer needed). */
int rope_config_from_dict(PyObject *d, cepe_rope_config *rc, PyObject *keep[2]);

#endif /* CEPE_C_ERRORS_H */
