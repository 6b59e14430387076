/* bind.c — the argument checks of bind.h. */
#include "bind.h"

PyArrayObject *bind_array(PyObject *obj, const char *what, int type, int ndim, int flags) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != type) {
        PyArray_Descr *want = PyArray_DescrFromType(type);
        PyErr_Format(PyExc_TypeError, "%s must have dtype %S, got %S", what, (PyObject *)want,
                     (PyObject *)PyArray_DESCR(a));
        Py_XDECREF(want);
        return NULL;
    }
    if (ndim >= 0 && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", what, ndim, PyArray_NDIM(a));
        return NULL;
    }
    if (!PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be in native byte order (use .astype(native dtype))", what);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned (use numpy.ascontiguousarray)",
                     what);
        return NULL;
    }
    if ((flags & BIND_WRITE) && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable (it is updated in place)", what);
        return NULL;
    }
    return a;
}

int bind_optional_array(PyObject *obj, const char *what, int type, int ndim, PyArrayObject **out) {
    *out = NULL;
    if (!obj || obj == Py_None) return 0;
    return (*out = bind_array(obj, what, type, ndim, 0)) ? 0 : -1;
}

int bind_dims(PyArrayObject *a, const char *what, int nd, const npy_intp *want) {
    for (int i = 0; i < nd; i++)
        if (PyArray_DIM(a, i) != want[i]) {
            PyErr_Format(PyExc_ValueError, "%s: axis %d has %zd entries, expected %zd", what, i,
                         (Py_ssize_t)PyArray_DIM(a, i), (Py_ssize_t)want[i]);
            return -1;
        }
    return 0;
}

int bind_int(PyObject *obj, const char *what, int lo, int hi, int *out) {
    PyObject *idx = PyNumber_Index(obj);
    if (!idx) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (v == -1 && !overflow && PyErr_Occurred()) return -1;
    if (overflow > 0 || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be <= %d, got %S", what, hi, obj);
        return -1;
    }
    if (overflow < 0 || v < lo) {
        PyErr_Format(PyExc_ValueError, "%s must be >= %d, got %S", what, lo, obj);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int bind_threads(long n_threads) {
    if (n_threads >= 1 && n_threads <= CEPE_MAX_THREADS) return 0;
    PyErr_Format(PyExc_ValueError, "n_threads must be in [1, %d], got %ld", CEPE_MAX_THREADS, n_threads);
    return -1;
}

cepe_model *bind_model(PyObject *obj) {
    if (!PyObject_TypeCheck(obj, &cepe_c_ModelType)) {
        PyErr_Format(PyExc_TypeError, "expected a cepe_c.Model, got %s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    cepe_model *m = ((ModelObject *)obj)->model;
    if (!m) PyErr_SetString(PyExc_RuntimeError, "the cepe_c.Model is not initialised");
    return m;
}
