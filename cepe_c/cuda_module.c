/* cepe_cuda — the optional CUDA extension (built only where nvcc is found).
 * For now it reports whether a device is usable; the CUDA backend's entry
 * points join it with the CUDA issue. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../kernels/cuda_probe.h"

static PyObject *probe(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    char msg[256] = {0};
    int n;
    Py_BEGIN_ALLOW_THREADS n = cepe_cuda_probe(msg, (int)sizeof msg);
    Py_END_ALLOW_THREADS return Py_BuildValue("(is)", n, msg);
}

static PyObject *runtime_version(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(cepe_cuda_runtime_version());
}

static PyMethodDef methods[] = {
    {"probe", probe, METH_NOARGS, "probe() -> (device_count or -1, description)"},
    {"runtime_version", runtime_version, METH_NOARGS, "CUDA runtime version this was built with"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "cepe_cuda", "cepe's CUDA extension", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit_cepe_cuda(void) { return PyModule_Create(&module); }
