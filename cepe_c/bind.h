/* bind.h — what the translation units of the cepe_c extension share: one
 * NumPy API table, the argument checks (bind.c), the status -> exception
 * mapping, and the Model object (module.c) that train_bindings.c also takes.
 *
 * Arrays are taken as they are: exact dtype, C-contiguous, aligned, native
 * byte order (writeable where the core writes). The friendly conversions
 * (lists, other dtypes, 1-D inputs) are the Python package's job. */
#ifndef CEPE_C_BIND_H
#define CEPE_C_BIND_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* One NumPy API table for the whole extension, imported by PyInit_cepe_c
 * (module.c defines CEPE_C_IMPORTS_NUMPY). */
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL cepe_c_numpy_api
#ifndef CEPE_C_IMPORTS_NUMPY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "../csrc/cepe.h"

/* ------------------------------------------------------------ errors */

/* Sets the Python exception for a failed cepe_status (ValueError for
 * CEPE_ERR_INVALID_ARG, ...) with cepe_last_error() as message; returns NULL. */
PyObject *raise_status(cepe_status st);

/* ---------------------------------------------------- argument checks */

#define BIND_WRITE 1 /* bind_array flag: the core writes into the array */

/* `obj` as an ndarray of `type` with `ndim` dims (-1: any), usable by C as
 * is; borrowed, or NULL with TypeError / ValueError naming `what`. */
PyArrayObject *bind_array(PyObject *obj, const char *what, int type, int ndim, int flags);
/* The same for an optional argument: None (or NULL) gives *out = NULL. */
int bind_optional_array(PyObject *obj, const char *what, int type, int ndim, PyArrayObject **out);
/* The first nd axes of a hold want[0..nd) entries, or -1 with ValueError. */
int bind_dims(PyArrayObject *a, const char *what, int nd, const npy_intp *want);
/* An int argument (anything with __index__) in [lo, hi] into *out, or -1
 * with TypeError / ValueError naming it (the "i" format's OverflowError
 * names nothing). */
int bind_int(PyObject *obj, const char *what, int lo, int hi, int *out);
/* n_threads in [1, CEPE_MAX_THREADS], or -1 with ValueError. */
int bind_threads(long n_threads);

/* ------------------------------------------------------- Model object */

typedef struct {
    PyObject_HEAD cepe_model *model;
    PyObject *weights; /* list: keeps every bound array alive (the CPU uses them in place) */
    PyObject *backend; /* the "cepe.backend" capsule the model runs on (kept alive), or NULL: the CPU */
    int n_threads;
} ModelObject;

extern PyTypeObject cepe_c_ModelType;

/* The initialised cepe_model behind a cepe_c.Model, or NULL with TypeError /
 * RuntimeError. */
cepe_model *bind_model(PyObject *obj);

/* ----------------------------------------------------- Sampler object */

typedef struct {
    PyObject_HEAD cepe_sampler *sampler;
    int batch, vocab_size;
    int busy; /* guarded by the GIL: set before releasing it */
} SamplerObject;

extern PyTypeObject cepe_c_SamplerType;

/* sampler_bindings.c: the cepe_sampler behind a cepe_c.Sampler, marked busy
 * for one call (bind_sampler_release ends it), or NULL with TypeError /
 * RuntimeError. */
cepe_sampler *bind_sampler(PyObject *obj);
void bind_sampler_release(PyObject *obj);

/* ------------------------------------------------------------- RoPE */

/* rope_bindings.c: a RoPE settings dict (cepe.rope.RopeSettings.to_core())
 * into rc; keep[] receives new references to the arrays rc's longrope
 * factors point into (Py_XDECREF them once rc is no longer needed). */
int rope_config_from_dict(PyObject *d, cepe_rope_config *rc, PyObject *keep[2]);

#endif /* CEPE_C_BIND_H */
