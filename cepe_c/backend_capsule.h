/* backend_capsule.h — an op table travels between extensions (cepe_cuda
 * makes one, cepe_c runs models on it) as a PyCapsule named "cepe.backend"
 * holding a cepe_backend *. */
#ifndef CEPE_BACKEND_CAPSULE_H
#define CEPE_BACKEND_CAPSULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../csrc/backend.h"

#define CEPE_BACKEND_CAPSULE "cepe.backend"

/* The table in a "cepe.backend" capsule of this op-table ABI; anything else
 * raises (TypeError / ValueError) and gives NULL. */
static inline const cepe_backend *cepe_backend_capsule_table(PyObject *obj) {
    if (!PyCapsule_IsValid(obj, CEPE_BACKEND_CAPSULE)) {
        PyErr_Format(PyExc_TypeError, "backend must be None or a %s capsule, got %.80s", CEPE_BACKEND_CAPSULE,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    const cepe_backend *be = PyCapsule_GetPointer(obj, CEPE_BACKEND_CAPSULE);
    if (!be) return NULL;
    if (be->abi != CEPE_BACKEND_ABI) {
        PyErr_Format(PyExc_ValueError,
                     "backend %.40s was built for op table ABI %d, this cepe_c has %d: rebuild both",
                     be->name ? be->name : "?", be->abi, CEPE_BACKEND_ABI);
        return NULL;
    }
    return be;
}

/* The table in obj: None gives the CPU table, else as above. */
static inline const cepe_backend *cepe_backend_from_capsule(PyObject *obj) {
    if (!obj || obj == Py_None) return cepe_backend_cpu();
    return cepe_backend_capsule_table(obj);
}

/* Capsule destructor: the capsule owns its backend. */
static inline void cepe_backend_capsule_destroy(PyObject *capsule) {
    cepe_backend *be = (cepe_backend *)PyCapsule_GetPointer(capsule, CEPE_BACKEND_CAPSULE);
    if (be && be->destroy) be->destroy(be);
}

/* A new "cepe.backend" capsule owning be (cepe_cuda.backend() makes them);
 * NULL with an exception set, be destroyed, on failure. */
static inline PyObject *cepe_backend_capsule_new(cepe_backend *be) {
    PyObject *capsule = PyCapsule_New(be, CEPE_BACKEND_CAPSULE, cepe_backend_capsule_destroy);
    if (!capsule && be->destroy) be->destroy(be);
    return capsule;
}

#endif /* CEPE_BACKEND_CAPSULE_H */
