/* cepe_cuda — the optional CUDA extension (built only where nvcc is found):
 * whether a device is usable, and the CUDA backend's op table (kernels/),
 * handed to cepe_c as a "cepe.backend" capsule (cepe_c/backend_capsule.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../kernels/cuda_backend.h"
#include "../kernels/cuda_probe.h"
#include "backend_capsule.h"

static PyObject *probe(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    char msg[256] = {0};
    int n;
    Py_BEGIN_ALLOW_THREADS n = cepe_cuda_probe(msg, (int)sizeof msg);
    Py_END_ALLOW_THREADS return Py_BuildValue("(is)", n, msg);
}

static PyObject *runtime_version(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(cepe_cuda_runtime_version());
}

static PyObject *backend(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    static char *kw[] = {"device", NULL};
    int device = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i", kw, &device)) return NULL;
    char msg[512] = {0};
    cepe_backend *be;
    Py_BEGIN_ALLOW_THREADS be = cepe_cuda_backend_create(device, msg, sizeof msg);
    Py_END_ALLOW_THREADS if (!be) return PyErr_Format(PyExc_RuntimeError, "CUDA backend: %s", msg);
    return cepe_backend_capsule_new(be);
}

static PyMethodDef methods[] = {
    {"probe", probe, METH_NOARGS, "probe() -> (device_count or -1, description)"},
    {"runtime_version", runtime_version, METH_NOARGS, "CUDA runtime version this was built with"},
    {"backend", (PyCFunction)(void (*)(void))backend, METH_VARARGS | METH_KEYWORDS,
     "backend(device=0) -> a \"cepe.backend\" capsule holding a new CUDA backend (its own stream, cuBLAS "
     "handle and "
     "memory cache; freed with the capsule). RuntimeError saying why when there is no usable device."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cepe_cuda", "cepe's CUDA extension", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_cepe_cuda(void) { return PyModule_Create(&module); }
