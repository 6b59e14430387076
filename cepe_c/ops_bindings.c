/* ops_bindings.c — test-only CPython face of the op table (csrc/backend.h):
 * every forward and backward op, the losses, the optimizer ops and the bf16
 * ops, so tests/test_ops.py can check the CPU ops against PyTorch and
 * tests/test_cuda_ops.py a device backend against the CPU. Every function is
 * named _op_<op> (the underscore: not a public API) and registered into
 * cepe_c by module.c through cepe_ops_methods.
 *
 * Each takes backend=None (the static CPU table) or a "cepe.backend" capsule
 * (cepe_c._sim_backend(), cepe_cuda.backend()) and runs the op through that
 * table. On a device backend (be->device) every array the op reads, and
 * every output it writes or adds into, is copied to a device buffer first;
 * outputs are copied back after the op, and the backend's sync turns any
 * failure into a RuntimeError carrying its message.
 *
 * Arguments are NumPy arrays of the exact dtype, C-contiguous, aligned and in
 * native byte order (no silent conversion: a test passing the wrong thing
 * should fail loudly); shapes are checked against each other. Outputs are new
 * arrays. Outputs the ops add into (the += gradients, matmul's accumulate)
 * start at zero, or at init times a fixed pattern in [-1, 1] when init != 0,
 * so a test can tell += from =. The GIL is released around the copies and
 * the op. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/backend.h"
#include "../csrc/cepe.h"
#include "../csrc/ops/elementwise_backward.h"
#include "../csrc/ops/ops_backward.h"
#include "backend_capsule.h"

/* This translation unit has its own NumPy API table (see rope_bindings.c). */
static int numpy_ready(void) { return PyArray_ImportNumPyAPI(); }

/* ----------------------------------------------------------- argument checks */

/* `obj` as an ndarray of dtype `type` (or `alt`, when not NPY_NOTYPE) with
 * `ndim` dims (-1: any), usable by C as is; borrowed, or NULL with an error. */
static PyArrayObject *arr(PyObject *obj, const char *what, int type, int alt, int ndim) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != type && (alt == NPY_NOTYPE || PyArray_TYPE(a) != alt)) {
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
    if (!PyArray_ISNOTSWAPPED(a) || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous, aligned and native-endian", what);
        return NULL;
    }
    for (int d = 0; d < PyArray_NDIM(a); d++)
        if (PyArray_DIM(a, d) > INT_MAX / 4) {
            PyErr_Format(PyExc_ValueError, "%s is too large", what);
            return NULL;
        }
    return a;
}

static float *F(PyArrayObject *a) { return a ? (float *)PyArray_DATA(a) : NULL; }

/* Axis `axis` of `a` must hold n entries. */
static int dim_is(PyArrayObject *a, const char *what, int axis, npy_intp n) {
    if (PyArray_DIM(a, axis) == n) return 0;
    PyErr_Format(PyExc_ValueError, "%s: axis %d has %zd entries, expected %zd", what, axis,
                 (Py_ssize_t)PyArray_DIM(a, axis), (Py_ssize_t)n);
    return -1;
}

static int same_shape(PyArrayObject *a, PyArrayObject *b, const char *what) {
    if (PyArray_SAMESHAPE(a, b)) return 0;
    PyErr_Format(PyExc_ValueError, "%s must have the same shape as the forward's input", what);
    return -1;
}

static int threads_ok(int n_threads) {
    if (n_threads >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %d", n_threads);
    return -1;
}

static PyArrayObject *zeros(int nd, const npy_intp *dims) {
    return (PyArrayObject *)PyArray_ZEROS(nd, (npy_intp *)dims, NPY_FLOAT32, 0);
}

/* Every id in [0, V). */
static int ids_ok(PyArrayObject *ids, npy_intp V) {
    const int32_t *p = (const int32_t *)PyArray_DATA(ids);
    for (npy_intp i = 0; i < PyArray_SIZE(ids); i++)
        if (p[i] < 0 || p[i] >= V) {
            PyErr_Format(PyExc_ValueError, "ids[%zd] = %d is outside [0, %zd)", (Py_ssize_t)i, p[i], (Py_ssize_t)V);
            return -1;
        }
    return 0;
}

/* --------------------------------------------------------------- op calls */

#define CALL_MAX_BUFS 16

/* One op run through a table. On the CPU table the op gets the NumPy
 * buffers themselves; on a device backend, the copies call_buf makes. */
typedef struct {
    const cepe_backend *be;
    int n, failed; /* failed: a copy could not be made, so the op must not run */
    struct {
        void *dev;
        void *host;
        size_t bytes;
        int out; /* copied back by call_end */
    } buf[CALL_MAX_BUFS];
    int status; /* after call_end: 0 or a CEPE_ERR_* */
    char msg[512];
} op_call;

static void call_begin(op_call *c, const cepe_backend *be) {
    memset(c, 0, sizeof *c);
    c->be = be;
}

/* The op's pointer for `bytes` of host memory: host itself on the CPU table,
 * else a device copy (with out, copied back by call_end). NULL stays NULL.
 * Touches no Python object: runs without the GIL. */
static void *call_buf(op_call *c, const void *host, size_t bytes, int out) {
    if (!host) return NULL;
    if (!c->be->device) return (void *)host;
    if (c->failed) return NULL;
    void *dev = c->n < CALL_MAX_BUFS ? c->be->alloc(c->be, bytes) : NULL;
    if (!dev) {
        c->failed = 1;
        snprintf(c->msg, sizeof c->msg, "cannot allocate %zu bytes on the device", bytes);
        return NULL;
    }
    c->buf[c->n].dev = dev;
    c->buf[c->n].host = (void *)host;
    c->buf[c->n].bytes = bytes;
    c->buf[c->n].out = out;
    c->n++;
    if (bytes && c->be->upload(c->be, dev, host, bytes)) c->failed = 1; /* the message comes from sync */
    return dev;
}

/* p, a pointer into the host buffer at host_base, in the copy at dev_base. */
static void *rebase(void *dev_base, const void *host_base, const void *p) {
    if (!p || !dev_base) return NULL;
    return (char *)dev_base + ((const char *)p - (const char *)host_base);
}

/* Whether the op may run. */
static int call_ok(const op_call *c) { return !c->failed; }

/* After the op returned st: outputs copied back, device buffers freed, the
 * backend synced; c->status and c->msg say what failed, if anything. */
static void call_end(op_call *c, int st) {
    const cepe_backend *be = c->be;
    if (!be->device) {
        if (st) {
            c->status = st;
            snprintf(c->msg, sizeof c->msg, "%s", cepe_last_error());
        }
        return;
    }
    int ok = !c->failed && !st;
    for (int i = 0; i < c->n; i++)
        if (ok && c->buf[i].out && c->buf[i].bytes && be->download(be, c->buf[i].host, c->buf[i].dev, c->buf[i].bytes))
            ok = 0;
    for (int i = 0; i < c->n; i++) be->free(be, c->buf[i].dev);
    char msg[sizeof c->msg];
    const int sst = be->sync(be, msg, sizeof msg);
    if (sst) {
        c->status = sst;
        snprintf(c->msg, sizeof c->msg, "%s", msg);
    } else if (!ok) {
        c->status = st ? st : CEPE_ERR_BACKEND;
        if (!c->msg[0]) snprintf(c->msg, sizeof c->msg, "the op failed but sync reported nothing");
    }
}

/* RuntimeError for a failed call (returns -1), else 0. With the GIL. */
static int call_raise(const op_call *c, const char *op) {
    if (!c->status) return 0;
    PyErr_Format(PyExc_RuntimeError, "%s on backend '%s' failed (status %d): %s", op, c->be->name, c->status, c->msg);
    return -1;
}

static size_t nbytes(PyArrayObject *a) { return a ? (size_t)PyArray_NBYTES(a) : 0; }

/* init * a fixed pattern in [-1, 1] into a +=-output (nothing when init == 0). */
static void seed(PyArrayObject *a, float init) {
    if (!a || init == 0.0f) return;
    float *p = (float *)PyArray_DATA(a);
    for (npy_intp i = 0; i < PyArray_SIZE(a); i++) {
        const uint32_t h = (uint32_t)i * 2654435761u; /* Knuth's multiplicative hash */
        p[i] = init * ((float)((h >> 16) % 2001u) / 1000.0f - 1.0f);
    }
}

#define KW(...) static char *kw[] = {__VA_ARGS__, NULL}

/* ------------------------------------------------------------------ embedding */

static PyObject *op_embedding_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("ids", "wte", "backend");
    PyObject *o_ids, *o_wte, *o_be = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$O", kw, &o_ids, &o_wte, &o_be) || numpy_ready() < 0) return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *ids = be ? arr(o_ids, "ids", NPY_INT32, NPY_NOTYPE, 1) : NULL;
    PyArrayObject *wte = ids ? arr(o_wte, "wte", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    if (!wte || ids_ok(ids, PyArray_DIM(wte, 0)) < 0) return NULL;
    const int N = (int)PyArray_DIM(ids, 0), C = (int)PyArray_DIM(wte, 1);
    npy_intp dims[2] = {N, C};
    PyArrayObject *out = zeros(2, dims);
    if (!out) return NULL;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *o = call_buf(&c, F(out), nbytes(out), 1);
    const int32_t *i = call_buf(&c, PyArray_DATA(ids), nbytes(ids), 0);
    const float *w = call_buf(&c, F(wte), nbytes(wte), 0);
    call_end(&c, call_ok(&c) ? be->embedding(be, o, i, w, N, C) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "embedding")) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

static PyObject *op_embedding_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "ids", "V", "init", "backend");
    PyObject *o_dout, *o_ids, *o_be = Py_None;
    int V;
    float init = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOi|$fO", kw, &o_dout, &o_ids, &V, &init, &o_be) ||
        numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *dout = be ? arr(o_dout, "dout", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *ids = dout ? arr(o_ids, "ids", NPY_INT32, NPY_NOTYPE, 1) : NULL;
    if (!ids || dim_is(ids, "ids", 0, PyArray_DIM(dout, 0)) < 0 || ids_ok(ids, V) < 0) return NULL;
    const int N = (int)PyArray_DIM(dout, 0), C = (int)PyArray_DIM(dout, 1);
    npy_intp dims[2] = {V, C};
    PyArrayObject *dwte = zeros(2, dims);
    if (!dwte) return NULL;
    seed(dwte, init);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *dw = call_buf(&c, F(dwte), nbytes(dwte), 1);
    const float *d = call_buf(&c, F(dout), nbytes(dout), 0);
    const int32_t *i = call_buf(&c, PyArray_DATA(ids), nbytes(ids), 0);
    call_end(&c, call_ok(&c) ? be->embedding_backward(be, dw, d, i, N, C) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "embedding_backward")) {
        Py_DECREF(dwte);
        return NULL;
    }
    return (PyObject *)dwte;
}

/* -------------------------------------------------------------------- rmsnorm */

static PyObject *op_rmsnorm_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("inp", "weight", "eps", "n_threads", "backend");
    PyObject *o_inp, *o_w, *o_be = Py_None;
    float eps;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOf|i$O", kw, &o_inp, &o_w, &eps, &n_threads, &o_be) ||
        numpy_ready() < 0 || threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *inp = be ? arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    if (!w || dim_is(w, "weight", 0, PyArray_DIM(inp, 1)) < 0) return NULL;
    PyArrayObject *out = zeros(2, PyArray_DIMS(inp));
    if (!out) return NULL;
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *o = call_buf(&c, F(out), nbytes(out), 1);
    const float *x = call_buf(&c, F(inp), nbytes(inp), 0), *wp = call_buf(&c, F(w), nbytes(w), 0);
    call_end(&c, call_ok(&c) ? be->rmsnorm(be, o, x, wp, N, C, eps, n_threads) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "rmsnorm")) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

static PyObject *op_rmsnorm_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "inp", "weight", "eps", "dweight", "init", "backend");
    PyObject *o_dout, *o_inp, *o_w, *o_be = Py_None;
    float eps, init = 0.0f;
    int want_dw = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOf|p$fO", kw, &o_dout, &o_inp, &o_w, &eps, &want_dw, &init,
                                     &o_be) ||
        numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *dout = be ? arr(o_dout, "dout", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *inp = dout ? arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    if (!w || same_shape(dout, inp, "dout") < 0 || dim_is(w, "weight", 0, PyArray_DIM(inp, 1)) < 0) return NULL;
    PyArrayObject *dinp = zeros(2, PyArray_DIMS(inp)), *dw = want_dw ? zeros(1, PyArray_DIMS(w)) : NULL;
    if (!dinp || (want_dw && !dw)) goto fail;
    seed(dinp, init);
    seed(dw, init);
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *dx = call_buf(&c, F(dinp), nbytes(dinp), 1), *dwp = call_buf(&c, F(dw), nbytes(dw), 1);
    const float *d = call_buf(&c, F(dout), nbytes(dout), 0), *x = call_buf(&c, F(inp), nbytes(inp), 0);
    const float *wp = call_buf(&c, F(w), nbytes(w), 0);
    call_end(&c, call_ok(&c) ? be->rmsnorm_backward(be, dx, dwp, d, x, wp, N, C, eps) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "rmsnorm_backward")) goto fail;
    if (!dw) return Py_BuildValue("(NO)", dinp, Py_None);
    return Py_BuildValue("(NN)", dinp, dw);
fail:
    Py_XDECREF(dinp);
    Py_XDECREF(dw);
    return NULL;
}

/* --------------------------------------------------------------------- matmul */

/* init != 0: out starts at init * pattern and the op runs with accumulate = 1. */
static PyObject *op_matmul_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("inp", "weight", "n_threads", "init", "backend");
    PyObject *o_inp, *o_w, *o_be = Py_None;
    int n_threads = 1;
    float init = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|i$fO", kw, &o_inp, &o_w, &n_threads, &init, &o_be) ||
        numpy_ready() < 0 || threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *inp = be ? arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    if (!w || dim_is(w, "weight", 1, PyArray_DIM(inp, 1)) < 0) return NULL;
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1), OC = (int)PyArray_DIM(w, 0);
    npy_intp dims[2] = {N, OC};
    PyArrayObject *out = zeros(2, dims);
    if (!out) return NULL;
    seed(out, init);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *o = call_buf(&c, F(out), nbytes(out), 1);
    const float *x = call_buf(&c, F(inp), nbytes(inp), 0), *wp = call_buf(&c, F(w), nbytes(w), 0);
    call_end(&c, call_ok(&c) ? be->matmul(be, o, x, wp, N, C, OC, init != 0.0f, n_threads) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "matmul")) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* dinp_into: an existing (N, C) array that receives dinp with accumulate = 1
 * (tests the flag); otherwise a new array with accumulate = 0. init seeds
 * dweight (+=). */
static PyObject *op_matmul_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "inp", "weight", "dinp", "dweight", "dinp_into", "n_threads", "init", "backend");
    PyObject *o_dout, *o_inp, *o_w, *o_into = Py_None, *o_be = Py_None;
    int want_dinp = 1, want_dw = 1, n_threads = 1;
    float init = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|ppOi$fO", kw, &o_dout, &o_inp, &o_w, &want_dinp, &want_dw,
                                     &o_into, &n_threads, &init, &o_be) ||
        numpy_ready() < 0 || threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *dout = be ? arr(o_dout, "dout", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *inp = dout ? arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    if (!w || dim_is(w, "weight", 1, PyArray_DIM(inp, 1)) < 0 ||
        dim_is(dout, "dout", 0, PyArray_DIM(inp, 0)) < 0 || dim_is(dout, "dout", 1, PyArray_DIM(w, 0)) < 0)
        return NULL;
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1), OC = (int)PyArray_DIM(w, 0);
    PyArrayObject *dinp = NULL, *dw = NULL;
    int accumulate = 0;
    if (o_into != Py_None) {
        PyArrayObject *into = arr(o_into, "dinp_into", NPY_FLOAT32, NPY_NOTYPE, 2);
        if (!into || same_shape(into, inp, "dinp_into") < 0) return NULL;
        if (!PyArray_ISWRITEABLE(into)) return PyErr_Format(PyExc_ValueError, "dinp_into must be writeable");
        Py_INCREF(into);
        dinp = into;
        accumulate = 1;
    } else if (want_dinp && !(dinp = zeros(2, PyArray_DIMS(inp))))
        goto fail;
    if (want_dw && !(dw = zeros(2, PyArray_DIMS(w)))) goto fail;
    seed(dw, init);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *dx = call_buf(&c, F(dinp), nbytes(dinp), 1), *dwp = call_buf(&c, F(dw), nbytes(dw), 1);
    const float *d = call_buf(&c, F(dout), nbytes(dout), 0), *x = call_buf(&c, F(inp), nbytes(inp), 0);
    const float *wp = call_buf(&c, F(w), nbytes(w), 0);
    call_end(&c, call_ok(&c) ? be->matmul_backward(be, dx, dwp, d, x, wp, N, C, OC, accumulate, n_threads) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "matmul_backward")) goto fail;
    return Py_BuildValue("(NN)", dinp ? (PyObject *)dinp : Py_NewRef(Py_None), dw ? (PyObject *)dw : Py_NewRef(Py_None));
fail:
    Py_XDECREF(dinp);
    Py_XDECREF(dw);
    return NULL;
}

/* ----------------------------------------------------------------------- rope */

static PyObject *op_rope_table(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("pos", "inv_freq", "mscale", "backend");
    PyObject *o_pos, *o_f, *o_be = Py_None;
    float mscale = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|f$O", kw, &o_pos, &o_f, &mscale, &o_be) || numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *pos = be ? arr(o_pos, "pos", NPY_FLOAT64, NPY_NOTYPE, 1) : NULL;
    PyArrayObject *f = pos ? arr(o_f, "inv_freq", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    if (!f) return NULL;
    const int N = (int)PyArray_DIM(pos, 0), half = (int)PyArray_DIM(f, 0);
    npy_intp dims[2] = {N, half};
    PyArrayObject *cs = zeros(2, dims), *sn = zeros(2, dims);
    if (!cs || !sn) goto fail;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *cp = call_buf(&c, F(cs), nbytes(cs), 1), *sp = call_buf(&c, F(sn), nbytes(sn), 1);
    const double *pp = call_buf(&c, PyArray_DATA(pos), nbytes(pos), 0);
    const float *fp = call_buf(&c, F(f), nbytes(f), 0);
    call_end(&c, call_ok(&c) ? be->rope_table(be, cp, sp, pp, fp, N, half, mscale) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "rope_table")) goto fail;
    return Py_BuildValue("(NN)", cs, sn);
fail:
    Py_XDECREF(cs);
    Py_XDECREF(sn);
    return NULL;
}

/* x (N, nh, hd) copied and rotated (backward = 0) or back-rotated (1). */
static PyObject *rope_common(PyObject *args, PyObject *kwds, int backward) {
    KW("x", "cos", "sin", "interleaved", "n_threads", "backend");
    PyObject *o_x, *o_c, *o_s, *o_be = Py_None;
    int interleaved = 0, n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|pi$O", kw, &o_x, &o_c, &o_s, &interleaved, &n_threads, &o_be) ||
        numpy_ready() < 0 || threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *x = be ? arr(o_x, "x", NPY_FLOAT32, NPY_NOTYPE, 3) : NULL;
    PyArrayObject *cs = x ? arr(o_c, "cos", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *sn = cs ? arr(o_s, "sin", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    if (!sn || dim_is(cs, "cos", 0, PyArray_DIM(x, 0)) < 0 || same_shape(sn, cs, "sin") < 0) return NULL;
    const int N = (int)PyArray_DIM(x, 0), nh = (int)PyArray_DIM(x, 1), hd = (int)PyArray_DIM(x, 2);
    const int half = (int)PyArray_DIM(cs, 1);
    if (2 * half > hd) return PyErr_Format(PyExc_ValueError, "cos has %d pairs but head_dim is %d", half, hd);
    PyArrayObject *y = (PyArrayObject *)PyArray_NewCopy(x, NPY_CORDER);
    if (!y) return NULL;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *yp = call_buf(&c, F(y), nbytes(y), 1);
    const float *cp = call_buf(&c, F(cs), nbytes(cs), 0), *sp = call_buf(&c, F(sn), nbytes(sn), 0);
    int st = 0;
    if (call_ok(&c))
        st = backward ? be->rope_backward(be, yp, cp, sp, N, nh, hd, half, interleaved)
                      : be->rope(be, yp, cp, sp, N, nh, hd, half, interleaved, n_threads);
    call_end(&c, st);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, backward ? "rope_backward" : "rope")) {
        Py_DECREF(y);
        return NULL;
    }
    return (PyObject *)y;
}

static PyObject *op_rope_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    return rope_common(args, kwds, 0);
}

static PyObject *op_rope_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    return rope_common(args, kwds, 1);
}

/* --------------------------------------------------------------------- swiglu */

static PyObject *op_swiglu_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("gate", "up", "n_threads", "backend");
    PyObject *o_g, *o_u, *o_be = Py_None;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|i$O", kw, &o_g, &o_u, &n_threads, &o_be) || numpy_ready() < 0 ||
        threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *g = be ? arr(o_g, "gate", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    PyArrayObject *u = g ? arr(o_u, "up", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    if (!u || same_shape(u, g, "up") < 0) return NULL;
    PyArrayObject *out = zeros(PyArray_NDIM(g), PyArray_DIMS(g));
    if (!out) return NULL;
    const long N = (long)PyArray_SIZE(g);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *o = call_buf(&c, F(out), nbytes(out), 1);
    const float *gp = call_buf(&c, F(g), nbytes(g), 0), *up = call_buf(&c, F(u), nbytes(u), 0);
    call_end(&c, call_ok(&c) ? be->swiglu(be, o, gp, up, N, n_threads) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "swiglu")) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

static PyObject *op_swiglu_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "gate", "up", "init", "backend");
    PyObject *o_d, *o_g, *o_u, *o_be = Py_None;
    float init = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$fO", kw, &o_d, &o_g, &o_u, &init, &o_be) || numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *d = be ? arr(o_d, "dout", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    PyArrayObject *g = d ? arr(o_g, "gate", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    PyArrayObject *u = g ? arr(o_u, "up", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    if (!u || same_shape(g, d, "gate") < 0 || same_shape(u, d, "up") < 0) return NULL;
    PyArrayObject *dg = zeros(PyArray_NDIM(g), PyArray_DIMS(g)), *du = zeros(PyArray_NDIM(g), PyArray_DIMS(g));
    if (!dg || !du) goto fail;
    seed(dg, init);
    seed(du, -init);
    const long N = (long)PyArray_SIZE(g);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *dgp = call_buf(&c, F(dg), nbytes(dg), 1), *dup = call_buf(&c, F(du), nbytes(du), 1);
    const float *dp = call_buf(&c, F(d), nbytes(d), 0), *gp = call_buf(&c, F(g), nbytes(g), 0);
    const float *up = call_buf(&c, F(u), nbytes(u), 0);
    call_end(&c, call_ok(&c) ? be->swiglu_backward(be, dgp, dup, dp, gp, up, N) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "swiglu_backward")) goto fail;
    return Py_BuildValue("(NN)", dg, du);
fail:
    Py_XDECREF(dg);
    Py_XDECREF(du);
    return NULL;
}

/* ------------------------------------------------------------------ attention */

/* Rows (B, T) of W floats: from a contiguous (B, T, W) array into a buffer
 * with row stride rs and batch stride bs (pack), and back (unpack). */
static void pack_rows(float *dst, long rs, long bs, const float *src, int B, int T, long W) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            memcpy(dst + b * bs + t * rs, src + ((long)b * T + t) * W, sizeof(float) * (size_t)W);
}
static void unpack_rows(float *dst, const float *src, long rs, long bs, int B, int T, long W) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            memcpy(dst + ((long)b * T + t) * W, src + b * bs + t * rs, sizeof(float) * (size_t)W);
}

/* Parsed attention arguments, and the layout the ops see:
 *  - plain: q, k, v as given, contiguous;
 *  - fused = 1: q, k, v packed into one (B, T, H + 2*KVH, hd) buffer, as a
 *    fused QKV projection writes them: row strides wider than a row;
 *  - kv_capacity > Tk: k, v (and key_valid) in (B, kv_capacity, ...) buffers
 *    as a KV cache holds them: batch strides wider than Tk rows, the rows
 *    past Tk filled with NaN (k, v) that no op may read.
 * Gradients of k, v come back laid out like them (and unpacked here). */
typedef struct {
    attention_shape s;
    PyArrayObject *q, *k, *v, *valid; /* borrowed */
    int fused, n_threads, kv_capacity;
    float *qkv, *kcap, *vcap;         /* packed copies (malloc) in the fused / capacity layouts, or NULL */
    uint8_t *validcap;
    const float *qbase, *kbase, *vbase; /* the buffers the ops read (kbase == qbase when fused) */
    size_t qbytes, kbytes, vbytes;
    const float *qp, *kp, *vp;        /* what the ops read: pointers into those buffers */
    const uint8_t *validp;
    size_t validbytes;
} att_args;

static void att_free(att_args *a) {
    free(a->qkv);
    free(a->kcap);
    free(a->vcap);
    free(a->validcap);
}

static int att_setup(att_args *a, PyObject *o_q, PyObject *o_k, PyObject *o_v, PyObject *o_valid, int causal,
                     int q_offset, int window, PyObject *o_scale) {
    a->q = arr(o_q, "q", NPY_FLOAT32, NPY_NOTYPE, 4);
    a->k = a->q ? arr(o_k, "k", NPY_FLOAT32, NPY_NOTYPE, 4) : NULL;
    a->v = a->k ? arr(o_v, "v", NPY_FLOAT32, NPY_NOTYPE, 4) : NULL;
    if (!a->v || same_shape(a->v, a->k, "v") < 0 || threads_ok(a->n_threads) < 0) return -1;
    const int B = (int)PyArray_DIM(a->q, 0), Tq = (int)PyArray_DIM(a->q, 1), H = (int)PyArray_DIM(a->q, 2);
    const int hd = (int)PyArray_DIM(a->q, 3), Tk = (int)PyArray_DIM(a->k, 1), KVH = (int)PyArray_DIM(a->k, 2);
    if (dim_is(a->k, "k", 0, B) < 0 || dim_is(a->k, "k", 3, hd) < 0) return -1;
    if (KVH < 1 || H % KVH != 0 || hd < 1 || hd > 256 || q_offset < 0 || window < 0) {
        PyErr_Format(PyExc_ValueError, "bad attention shape: H=%d KVH=%d hd=%d (<= 256) q_offset=%d window=%d", H, KVH,
                     hd, q_offset, window);
        return -1;
    }
    a->valid = NULL;
    if (o_valid != Py_None) {
        a->valid = arr(o_valid, "key_valid", NPY_UINT8, NPY_BOOL, 2);
        if (!a->valid || dim_is(a->valid, "key_valid", 0, B) < 0 || dim_is(a->valid, "key_valid", 1, Tk) < 0)
            return -1;
    }
    double scale = 1.0 / sqrt((double)hd);
    if (o_scale != Py_None) {
        scale = PyFloat_AsDouble(o_scale);
        if (scale == -1.0 && PyErr_Occurred()) return -1;
    }
    if (a->fused && a->kv_capacity) {
        PyErr_SetString(PyExc_ValueError, "fused=True and kv_capacity are exclusive");
        return -1;
    }
    if (a->kv_capacity && a->kv_capacity < Tk) {
        PyErr_Format(PyExc_ValueError, "kv_capacity %d is below Tk = %d", a->kv_capacity, Tk);
        return -1;
    }
    attention_shape s = {B, Tq, Tk, H, KVH, hd};
    s.causal = causal;
    s.q_offset = q_offset;
    s.window = window;
    s.scale = (float)scale;
    s.q_rstride = (long)H * hd;
    s.q_bstride = (long)Tq * H * hd;
    s.kv_rstride = (long)KVH * hd;
    s.kv_bstride = (long)Tk * KVH * hd;
    s.valid_bstride = Tk;
    a->qp = a->qbase = F(a->q);
    a->kp = a->kbase = F(a->k);
    a->vp = a->vbase = F(a->v);
    a->qbytes = nbytes(a->q);
    a->kbytes = a->vbytes = nbytes(a->k);
    a->validp = a->valid ? (const uint8_t *)PyArray_DATA(a->valid) : NULL;
    a->validbytes = nbytes(a->valid);
    if (a->fused) {
        if (Tq != Tk) {
            PyErr_SetString(PyExc_ValueError, "fused=True needs Tq == Tk (self-attention)");
            return -1;
        }
        const long W = (long)(H + 2 * KVH) * hd, rows = (long)B * Tq;
        if (!(a->qkv = malloc(sizeof(float) * (size_t)(rows * W)))) {
            PyErr_NoMemory();
            return -1;
        }
        pack_rows(a->qkv, W, (long)Tq * W, F(a->q), B, Tq, (long)H * hd);
        pack_rows(a->qkv + (long)H * hd, W, (long)Tq * W, F(a->k), B, Tk, (long)KVH * hd);
        pack_rows(a->qkv + (long)(H + KVH) * hd, W, (long)Tq * W, F(a->v), B, Tk, (long)KVH * hd);
        s.q_rstride = s.kv_rstride = W;
        s.q_bstride = s.kv_bstride = (long)Tq * W;
        a->qbase = a->kbase = a->vbase = a->qkv;
        a->qbytes = a->kbytes = a->vbytes = sizeof(float) * (size_t)(rows * W);
        a->qp = a->qkv;
        a->kp = a->qkv + (long)H * hd;
        a->vp = a->qkv + (long)(H + KVH) * hd;
    } else if (a->kv_capacity) {
        const long W = (long)KVH * hd, cap = a->kv_capacity, n = (long)B * cap * W;
        a->kcap = malloc(sizeof(float) * (size_t)n);
        a->vcap = malloc(sizeof(float) * (size_t)n);
        a->validcap = malloc((size_t)(B * cap));
        if (!a->kcap || !a->vcap || !a->validcap) {
            PyErr_NoMemory();
            return -1;
        }
        for (long i = 0; i < n; i++) a->kcap[i] = a->vcap[i] = NAN; /* rows past Tk: never read */
        pack_rows(a->kcap, W, cap * W, F(a->k), B, Tk, W);
        pack_rows(a->vcap, W, cap * W, F(a->v), B, Tk, W);
        for (long b = 0; b < B; b++)
            for (long j = 0; j < cap; j++) /* past Tk: a pattern the masks must not need */
                a->validcap[b * cap + j] = j < Tk ? (a->validp ? a->validp[b * Tk + j] : 1) : (uint8_t)(j & 1);
        s.kv_bstride = cap * W;
        s.valid_bstride = cap;
        a->kp = a->kbase = a->kcap;
        a->vp = a->vbase = a->vcap;
        a->kbytes = a->vbytes = sizeof(float) * (size_t)n;
        if (a->validp) {
            a->validp = a->validcap;
            a->validbytes = (size_t)(B * cap);
        }
    }
    a->s = s;
    return 0;
}

/* The ops' q, k, v, key_valid pointers for the call: the host buffers on the
 * CPU table, device copies otherwise (one copy of a fused buffer). */
static void att_inputs(op_call *c, const att_args *a, const float **q, const float **k, const float **v,
                       const uint8_t **valid) {
    void *qb = call_buf(c, a->qbase, a->qbytes, 0);
    void *kb = a->kbase == a->qbase ? qb : call_buf(c, a->kbase, a->kbytes, 0);
    void *vb = a->vbase == a->qbase ? qb : call_buf(c, a->vbase, a->vbytes, 0);
    *q = rebase(qb, a->qbase, a->qp);
    *k = rebase(kb, a->kbase, a->kp);
    *v = rebase(vb, a->vbase, a->vp);
    *valid = call_buf(c, a->validp, a->validbytes, 0);
}

#define ATT_KW "q", "k", "v", "key_valid", "causal", "q_offset", "window", "scale", "n_threads", "fused"

/* with_lse = 0: the attention op -> out; 1: attention_lse -> (out, lse). */
static PyObject *attention_fwd_common(PyObject *args, PyObject *kwds, int with_lse) {
    KW(ATT_KW, "kv_capacity", "backend");
    PyObject *o_q, *o_k, *o_v, *o_valid = Py_None, *o_scale = Py_None, *o_be = Py_None;
    int causal = 0, q_offset = 0, window = 0;
    att_args a = {0};
    a.n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OpiiOip$iO", kw, &o_q, &o_k, &o_v, &o_valid, &causal, &q_offset,
                                     &window, &o_scale, &a.n_threads, &a.fused, &a.kv_capacity, &o_be) ||
        numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    if (!be || att_setup(&a, o_q, o_k, o_v, o_valid, causal, q_offset, window, o_scale) < 0) {
        att_free(&a);
        return NULL;
    }
    PyArrayObject *out = zeros(4, PyArray_DIMS(a.q)), *lse = NULL;
    if (with_lse) lse = zeros(3, PyArray_DIMS(a.q));
    if (!out || (with_lse && !lse)) goto fail;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *o = call_buf(&c, F(out), nbytes(out), 1), *l = call_buf(&c, F(lse), nbytes(lse), 1);
    const float *q, *k, *v;
    const uint8_t *valid;
    att_inputs(&c, &a, &q, &k, &v, &valid);
    int st = 0;
    if (call_ok(&c))
        st = with_lse ? be->attention_lse(be, o, l, q, k, v, valid, &a.s, a.n_threads)
                      : be->attention(be, o, q, k, v, valid, &a.s, a.n_threads);
    call_end(&c, st);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, with_lse ? "attention_lse" : "attention")) goto fail;
    att_free(&a);
    if (!with_lse) return (PyObject *)out;
    return Py_BuildValue("(NN)", out, lse);
fail:
    Py_XDECREF(out);
    Py_XDECREF(lse);
    att_free(&a);
    return NULL;
}

static PyObject *op_attention_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    return attention_fwd_common(args, kwds, 0);
}

static PyObject *op_attention_forward_lse(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    return attention_fwd_common(args, kwds, 1);
}

/* Whether every float of rows Tk.. of a (B, cap, W) buffer is still NaN. */
static int tail_untouched(const float *buf, int B, int Tk, long cap, long W) {
    for (long b = 0; b < B; b++)
        for (long i = (long)Tk * W; i < cap * W; i++)
            if (!isnan(buf[b * cap * W + i])) return 0;
    return 1;
}

/* (dq, dk, dv); `need` names the gradients to compute ("qkv", "kv", "q", ...),
 * the others are passed to C as NULL and returned as None. */
static PyObject *op_attention_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "out", "lse", ATT_KW, "need", "kv_capacity", "init", "backend");
    PyObject *o_dout, *o_out, *o_lse, *o_q, *o_k, *o_v, *o_valid = Py_None, *o_scale = Py_None, *o_be = Py_None;
    int causal = 0, q_offset = 0, window = 0;
    float init = 0.0f;
    const char *need = "qkv";
    att_args a = {0};
    a.n_threads = 1;
    PyArrayObject *dq = NULL, *dk = NULL, *dv = NULL;
    float *gbuf = NULL, *gk = NULL, *gv = NULL; /* gradients in the fused / capacity layouts */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|OpiiOips$ifO", kw, &o_dout, &o_out, &o_lse, &o_q, &o_k, &o_v,
                                     &o_valid, &causal, &q_offset, &window, &o_scale, &a.n_threads, &a.fused, &need,
                                     &a.kv_capacity, &init, &o_be) ||
        numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    if (!be || att_setup(&a, o_q, o_k, o_v, o_valid, causal, q_offset, window, o_scale) < 0) goto fail;
    PyArrayObject *dout = arr(o_dout, "dout", NPY_FLOAT32, NPY_NOTYPE, 4);
    PyArrayObject *out = dout ? arr(o_out, "out", NPY_FLOAT32, NPY_NOTYPE, 4) : NULL;
    if (!out || same_shape(dout, a.q, "dout") < 0 || same_shape(out, a.q, "out") < 0) goto fail;
    PyArrayObject *lse = NULL;
    if (o_lse != Py_None) {
        lse = arr(o_lse, "lse", NPY_FLOAT32, NPY_NOTYPE, 3);
        if (!lse) goto fail;
        for (int d = 0; d < 3; d++)
            if (dim_is(lse, "lse", d, PyArray_DIM(a.q, d)) < 0) goto fail;
    }
    const int want_q = strchr(need, 'q') != NULL, want_k = strchr(need, 'k') != NULL;
    const int want_v = strchr(need, 'v') != NULL;
    if ((want_q && !(dq = zeros(4, PyArray_DIMS(a.q)))) || (want_k && !(dk = zeros(4, PyArray_DIMS(a.k)))) ||
        (want_v && !(dv = zeros(4, PyArray_DIMS(a.v)))))
        goto fail;
    seed(dq, init);
    seed(dk, init);
    seed(dv, -init);
    const attention_shape *s = &a.s;
    const long hq = (long)s->H * s->hd, hkv = (long)s->KVH * s->hd;
    /* gradient buffers the op writes: the arrays, or packed like q, k, v */
    float *pdq = F(dq), *pdk = F(dk), *pdv = F(dv);
    const float *gq_base = pdq, *gk_base = pdk, *gv_base = pdv;
    size_t gq_bytes = nbytes(dq), gk_bytes = nbytes(dk), gv_bytes = nbytes(dv);
    if (a.fused) { /* one buffer laid out like qkv */
        const long W = hq + 2 * hkv, bs = (long)s->Tq * W;
        if (!(gbuf = calloc((size_t)(s->B * bs), sizeof(float)))) {
            PyErr_NoMemory();
            goto fail;
        }
        if (dq) pack_rows(gbuf, W, bs, F(dq), s->B, s->Tq, hq);
        if (dk) pack_rows(gbuf + hq, W, bs, F(dk), s->B, s->Tk, hkv);
        if (dv) pack_rows(gbuf + hq + hkv, W, bs, F(dv), s->B, s->Tk, hkv);
        pdq = dq ? gbuf : NULL;
        pdk = dk ? gbuf + hq : NULL;
        pdv = dv ? gbuf + hq + hkv : NULL;
        gq_base = gk_base = gv_base = gbuf;
        gq_bytes = gk_bytes = gv_bytes = sizeof(float) * (size_t)(s->B * bs);
    } else if (a.kv_capacity) { /* (B, capacity, KVH*hd), NaN past Tk: the op must leave that alone */
        const long n = (long)s->B * s->kv_bstride;
        if ((dk && !(gk = malloc(sizeof(float) * (size_t)n))) || (dv && !(gv = malloc(sizeof(float) * (size_t)n)))) {
            PyErr_NoMemory();
            goto fail;
        }
        for (long i = 0; i < n; i++) {
            if (gk) gk[i] = NAN;
            if (gv) gv[i] = NAN;
        }
        if (gk) pack_rows(gk, hkv, s->kv_bstride, F(dk), s->B, s->Tk, hkv);
        if (gv) pack_rows(gv, hkv, s->kv_bstride, F(dv), s->B, s->Tk, hkv);
        gk_base = pdk = gk;
        gv_base = pdv = gv;
        gk_bytes = gv_bytes = sizeof(float) * (size_t)n;
    }
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    void *gqd = call_buf(&c, gq_base, gq_bytes, 1); /* fused: one copy for all three */
    void *gkd = a.fused ? gqd : call_buf(&c, gk_base, gk_bytes, 1);
    void *gvd = a.fused ? gqd : call_buf(&c, gv_base, gv_bytes, 1);
    float *oq = rebase(gqd, gq_base, pdq), *ok = rebase(gkd, gk_base, pdk), *ov = rebase(gvd, gv_base, pdv);
    const float *d = call_buf(&c, F(dout), nbytes(dout), 0), *o = call_buf(&c, F(out), nbytes(out), 0);
    const float *l = call_buf(&c, F(lse), nbytes(lse), 0);
    const float *q, *k, *v;
    const uint8_t *valid;
    att_inputs(&c, &a, &q, &k, &v, &valid);
    call_end(&c, call_ok(&c) ? be->attention_backward(be, oq, ok, ov, d, q, k, v, o, l, valid, s, a.n_threads) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "attention_backward")) goto fail;
    if (a.fused) {
        const long W = hq + 2 * hkv, bs = (long)s->Tq * W;
        if (dq) unpack_rows(F(dq), gbuf, W, bs, s->B, s->Tq, hq);
        if (dk) unpack_rows(F(dk), gbuf + hq, W, bs, s->B, s->Tk, hkv);
        if (dv) unpack_rows(F(dv), gbuf + hq + hkv, W, bs, s->B, s->Tk, hkv);
    } else if (a.kv_capacity) {
        if ((gk && !tail_untouched(gk, s->B, s->Tk, a.kv_capacity, hkv)) ||
            (gv && !tail_untouched(gv, s->B, s->Tk, a.kv_capacity, hkv))) {
            PyErr_SetString(PyExc_RuntimeError, "attention_backward wrote into the kv rows past Tk");
            goto fail;
        }
        if (gk) unpack_rows(F(dk), gk, hkv, s->kv_bstride, s->B, s->Tk, hkv);
        if (gv) unpack_rows(F(dv), gv, hkv, s->kv_bstride, s->B, s->Tk, hkv);
    }
    free(gbuf);
    free(gk);
    free(gv);
    att_free(&a);
    return Py_BuildValue("(NNN)", dq ? (PyObject *)dq : Py_NewRef(Py_None), dk ? (PyObject *)dk : Py_NewRef(Py_None),
                         dv ? (PyObject *)dv : Py_NewRef(Py_None));
fail:
    Py_XDECREF(dq);
    Py_XDECREF(dk);
    Py_XDECREF(dv);
    free(gbuf);
    free(gk);
    free(gv);
    att_free(&a);
    return NULL;
}

/* --------------------------------------------------------------------- losses */

static PyObject *op_cross_entropy(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("logits", "targets", "dloss_scale", "grad", "init", "backend");
    PyObject *o_z, *o_t, *o_be = Py_None;
    float scale = 1.0f, init = 0.0f;
    int grad = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|fp$fO", kw, &o_z, &o_t, &scale, &grad, &init, &o_be) ||
        numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *z = be ? arr(o_z, "logits", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *t = z ? arr(o_t, "targets", NPY_INT32, NPY_NOTYPE, 1) : NULL;
    if (!t || dim_is(t, "targets", 0, PyArray_DIM(z, 0)) < 0) return NULL;
    const int N = (int)PyArray_DIM(z, 0), V = (int)PyArray_DIM(z, 1);
    const int32_t *tp = (const int32_t *)PyArray_DATA(t);
    for (int i = 0; i < N; i++) /* the table's contract: the caller range-checks targets */
        if (tp[i] != CEPE_IGNORE_INDEX && (tp[i] < 0 || tp[i] >= V))
            return PyErr_Format(PyExc_ValueError, "targets must be in [0, %d) or %d", V, CEPE_IGNORE_INDEX);
    npy_intp n = N;
    PyArrayObject *losses = zeros(1, &n), *dz = grad ? zeros(2, PyArray_DIMS(z)) : NULL;
    if (!losses || (grad && !dz)) goto fail;
    seed(dz, init);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *lp = call_buf(&c, F(losses), nbytes(losses), 1), *dzp = call_buf(&c, F(dz), nbytes(dz), 1);
    const float *zp = call_buf(&c, F(z), nbytes(z), 0);
    const int32_t *td = call_buf(&c, tp, nbytes(t), 0);
    call_end(&c, call_ok(&c) ? be->cross_entropy(be, lp, dzp, zp, td, N, V, scale) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "cross_entropy")) goto fail;
    return Py_BuildValue("(NN)", losses, dz ? (PyObject *)dz : Py_NewRef(Py_None));
fail:
    Py_XDECREF(losses);
    Py_XDECREF(dz);
    return NULL;
}

static PyObject *op_kl_topk(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("logits", "teacher_probs", "teacher_index", "mode", "delta", "dloss_scale", "grad", "init", "backend");
    PyObject *o_z, *o_p, *o_i, *o_be = Py_None;
    int mode, grad = 1;
    float delta = 0.0f, scale = 1.0f, init = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOi|ffp$fO", kw, &o_z, &o_p, &o_i, &mode, &delta, &scale, &grad,
                                     &init, &o_be) ||
        numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *z = be ? arr(o_z, "logits", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *p = z ? arr(o_p, "teacher_probs", NPY_FLOAT16, NPY_UINT16, 2) : NULL;
    PyArrayObject *ix = p ? arr(o_i, "teacher_index", NPY_INT32, NPY_NOTYPE, 2) : NULL;
    if (!ix) return NULL;
    const int N = (int)PyArray_DIM(z, 0), V = (int)PyArray_DIM(z, 1), K = (int)PyArray_DIM(ix, 1);
    if (dim_is(ix, "teacher_index", 0, N) < 0 || dim_is(p, "teacher_probs", 0, N) < 0 ||
        dim_is(p, "teacher_probs", 1, (npy_intp)K + 1) < 0)
        return NULL;
    /* what the CPU op refuses, refused here for every backend (a device
     * backend sees the indices only on the device) */
    int bad = K < 1 || (mode != CEPE_KL_SMOOTH && mode != CEPE_KL_DROP) || (mode == CEPE_KL_SMOOTH && !(delta >= 0.0f));
    const int32_t *ip = (const int32_t *)PyArray_DATA(ix);
    for (npy_intp i = 0; i < PyArray_SIZE(ix) && !bad; i++) bad = ip[i] < 0 || ip[i] >= V;
    if (bad)
        return PyErr_Format(PyExc_ValueError,
                            "kl_topk: mode must be %d (smooth, delta >= 0) or %d (drop), K >= 1, teacher_index in [0, %d)",
                            CEPE_KL_SMOOTH, CEPE_KL_DROP, V);
    npy_intp n = N;
    PyArrayObject *losses = zeros(1, &n), *dz = grad ? zeros(2, PyArray_DIMS(z)) : NULL;
    if (!losses || (grad && !dz)) goto fail;
    seed(dz, init);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *lp = call_buf(&c, F(losses), nbytes(losses), 1), *dzp = call_buf(&c, F(dz), nbytes(dz), 1);
    const float *zp = call_buf(&c, F(z), nbytes(z), 0);
    const uint16_t *pp = call_buf(&c, PyArray_DATA(p), nbytes(p), 0);
    const int32_t *id = call_buf(&c, ip, nbytes(ix), 0);
    call_end(&c, call_ok(&c) ? be->kl_topk(be, lp, dzp, zp, pp, id, N, V, K, mode, delta, scale) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "kl_topk")) goto fail;
    return Py_BuildValue("(NN)", losses, dz ? (PyObject *)dz : Py_NewRef(Py_None));
fail:
    Py_XDECREF(losses);
    Py_XDECREF(dz);
    return NULL;
}

static PyObject *op_half_to_float(PyObject *Py_UNUSED(m), PyObject *o) {
    if (numpy_ready() < 0) return NULL;
    PyArrayObject *h = arr(o, "bits", NPY_UINT16, NPY_FLOAT16, -1);
    if (!h) return NULL;
    PyArrayObject *out = zeros(PyArray_NDIM(h), PyArray_DIMS(h));
    if (!out) return NULL;
    const uint16_t *src = (const uint16_t *)PyArray_DATA(h);
    float *dst = F(out);
    for (npy_intp i = 0; i < PyArray_SIZE(h); i++) dst[i] = cepe_half_to_float(src[i]);
    return (PyObject *)out;
}

/* ------------------------------------------------------------------ optimizer */

/* g (n,) -> partial sums of squares per CEPE_NORM_CHUNK chunk, float64 */
static PyObject *op_sumsq_chunks(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("g", "n_threads", "backend");
    PyObject *o_g, *o_be = Py_None;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|i$O", kw, &o_g, &n_threads, &o_be) || numpy_ready() < 0 ||
        threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *g = be ? arr(o_g, "g", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    if (!g) return NULL;
    const size_t n = (size_t)PyArray_SIZE(g);
    npy_intp chunks = (npy_intp)((n + CEPE_NORM_CHUNK - 1) / CEPE_NORM_CHUNK);
    PyArrayObject *partial = (PyArrayObject *)PyArray_ZEROS(1, &chunks, NPY_FLOAT64, 0);
    if (!partial) return NULL;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    double *pp = call_buf(&c, PyArray_DATA(partial), nbytes(partial), 1);
    const float *gp = call_buf(&c, F(g), nbytes(g), 0);
    call_end(&c, call_ok(&c) ? be->sumsq_chunks(be, pp, gp, n, n_threads) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "sumsq_chunks")) {
        Py_DECREF(partial);
        return NULL;
    }
    return (PyObject *)partial;
}

/* x * s, as a copy */
static PyObject *op_scale(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("x", "s", "n_threads", "backend");
    PyObject *o_x, *o_be = Py_None;
    float s;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Of|i$O", kw, &o_x, &s, &n_threads, &o_be) || numpy_ready() < 0 ||
        threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *x = be ? arr(o_x, "x", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    if (!x) return NULL;
    PyArrayObject *y = (PyArrayObject *)PyArray_NewCopy(x, NPY_CORDER);
    if (!y) return NULL;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *yp = call_buf(&c, F(y), nbytes(y), 1);
    call_end(&c, call_ok(&c) ? be->scale(be, yp, s, (size_t)PyArray_SIZE(y), n_threads) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "scale")) {
        Py_DECREF(y);
        return NULL;
    }
    return (PyObject *)y;
}

/* One AdamW step on copies of p, m, v -> (p, m, v); the scalars as
 * cepe_adamw_scalars computes them (adamw.c). */
static PyObject *op_adamw(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("p", "g", "m", "v", "decay", "w1", "b2", "w2", "bc2_sqrt", "neg_step", "eps", "n_threads", "backend");
    PyObject *o_p, *o_g, *o_m, *o_v, *o_be = Py_None;
    float decay, w1, b2, w2, bc2_sqrt, neg_step, eps;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOfffffff|i$O", kw, &o_p, &o_g, &o_m, &o_v, &decay, &w1, &b2, &w2,
                                     &bc2_sqrt, &neg_step, &eps, &n_threads, &o_be) ||
        numpy_ready() < 0 || threads_ok(n_threads) < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *p = be ? arr(o_p, "p", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    PyArrayObject *g = p ? arr(o_g, "g", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    PyArrayObject *mm = g ? arr(o_m, "m", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    PyArrayObject *vv = mm ? arr(o_v, "v", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    if (!vv || same_shape(g, p, "g") < 0 || same_shape(mm, p, "m") < 0 || same_shape(vv, p, "v") < 0) return NULL;
    PyArrayObject *po = (PyArrayObject *)PyArray_NewCopy(p, NPY_CORDER);
    PyArrayObject *mo = (PyArrayObject *)PyArray_NewCopy(mm, NPY_CORDER);
    PyArrayObject *vo = (PyArrayObject *)PyArray_NewCopy(vv, NPY_CORDER);
    if (!po || !mo || !vo) goto fail;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *pp = call_buf(&c, F(po), nbytes(po), 1), *mp = call_buf(&c, F(mo), nbytes(mo), 1);
    float *vp = call_buf(&c, F(vo), nbytes(vo), 1);
    const float *gp = call_buf(&c, F(g), nbytes(g), 0);
    call_end(&c, call_ok(&c) ? be->adamw(be, pp, gp, mp, vp, (size_t)PyArray_SIZE(p), decay, w1, b2, w2, bc2_sqrt,
                                         neg_step, eps, n_threads)
                             : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "adamw")) goto fail;
    return Py_BuildValue("(NNN)", po, mo, vo);
fail:
    Py_XDECREF(po);
    Py_XDECREF(mo);
    Py_XDECREF(vo);
    return NULL;
}

/* ----------------------------------------------------------------------- bf16 */

static int has_op(const cepe_backend *be, int present, const char *name) {
    if (present) return 0;
    PyErr_Format(PyExc_NotImplementedError, "backend '%s' has no %s op", be->name, name);
    return -1;
}

/* x float32 -> bf16 bits (uint16), through the table's to_bf16 */
static PyObject *op_to_bf16(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("x", "backend");
    PyObject *o_x, *o_be = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$O", kw, &o_x, &o_be) || numpy_ready() < 0) return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *x = be ? arr(o_x, "x", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    if (!x || has_op(be, be->to_bf16 != NULL, "to_bf16") < 0) return NULL;
    PyArrayObject *y = (PyArrayObject *)PyArray_ZEROS(PyArray_NDIM(x), PyArray_DIMS(x), NPY_UINT16, 0);
    if (!y) return NULL;
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    uint16_t *yp = call_buf(&c, PyArray_DATA(y), nbytes(y), 1);
    const float *xp = call_buf(&c, F(x), nbytes(x), 0);
    call_end(&c, call_ok(&c) ? be->to_bf16(be, yp, xp, (size_t)PyArray_SIZE(x)) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "to_bf16")) {
        Py_DECREF(y);
        return NULL;
    }
    return (PyObject *)y;
}

/* The host reference of to_bf16: elementwise.h's cepe_float_to_bf16, the
 * function the CUDA kernel runs (the CPU table has no bf16 ops). */
static PyObject *op_bf16_round(PyObject *Py_UNUSED(m), PyObject *o) {
    if (numpy_ready() < 0) return NULL;
    PyArrayObject *x = arr(o, "x", NPY_FLOAT32, NPY_NOTYPE, -1);
    if (!x) return NULL;
    PyArrayObject *y = (PyArrayObject *)PyArray_ZEROS(PyArray_NDIM(x), PyArray_DIMS(x), NPY_UINT16, 0);
    if (!y) return NULL;
    const float *src = F(x);
    uint16_t *dst = (uint16_t *)PyArray_DATA(y);
    for (npy_intp i = 0; i < PyArray_SIZE(x); i++) dst[i] = cepe_float_to_bf16(src[i]);
    return (PyObject *)y;
}

/* inp (N, C) float32, weight (OC, C) bf16 bits -> out (N, OC); init as _op_matmul_forward */
static PyObject *op_matmul_bf16(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("inp", "weight", "init", "backend");
    PyObject *o_inp, *o_w, *o_be = Py_None;
    float init = 0.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$fO", kw, &o_inp, &o_w, &init, &o_be) || numpy_ready() < 0)
        return NULL;
    const cepe_backend *be = cepe_backend_from_capsule(o_be);
    PyArrayObject *inp = be ? arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_UINT16, NPY_NOTYPE, 2) : NULL;
    if (!w || dim_is(w, "weight", 1, PyArray_DIM(inp, 1)) < 0 ||
        has_op(be, be->matmul_bf16 != NULL, "matmul_bf16") < 0)
        return NULL;
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1), OC = (int)PyArray_DIM(w, 0);
    npy_intp dims[2] = {N, OC};
    PyArrayObject *out = zeros(2, dims);
    if (!out) return NULL;
    seed(out, init);
    op_call c;
    call_begin(&c, be);
    Py_BEGIN_ALLOW_THREADS
    float *o = call_buf(&c, F(out), nbytes(out), 1);
    const float *x = call_buf(&c, F(inp), nbytes(inp), 0);
    const uint16_t *wp = call_buf(&c, PyArray_DATA(w), nbytes(w), 0);
    call_end(&c, call_ok(&c) ? be->matmul_bf16(be, o, x, wp, N, C, OC, init != 0.0f, 1) : 0);
    Py_END_ALLOW_THREADS
    if (call_raise(&c, "matmul_bf16")) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* ---------------------------------------------------------------------- table */

#define BE "; backend=None (CPU) or a cepe.backend capsule"
#define M(name, doc) {"_op_" #name, (PyCFunction)(void (*)(void))op_##name, METH_VARARGS | METH_KEYWORDS, doc BE}
PyMethodDef cepe_ops_methods[] = {
    M(embedding_forward, "(ids int32 (N,), wte (V, C)) -> out (N, C)"),
    M(embedding_backward, "(dout (N, C), ids (N,), V, init=0) -> dwte (V, C)"),
    M(rmsnorm_forward, "(inp (N, C), weight (C,), eps, n_threads=1) -> out"),
    M(rmsnorm_backward, "(dout, inp, weight, eps, dweight=True, init=0) -> (dinp, dweight | None)"),
    M(matmul_forward, "(inp (N, C), weight (OC, C), n_threads=1, init=0 (!= 0: accumulate)) -> out (N, OC)"),
    M(matmul_backward,
      "(dout, inp, weight, dinp=True, dweight=True, dinp_into=None, n_threads=1, init=0) -> (dinp, dweight)"),
    M(rope_table, "(pos float64 (N,), inv_freq (half,), mscale=1) -> (cos, sin) (N, half)"),
    M(rope_forward, "(x (N, nh, hd), cos (N, half), sin, interleaved=False, n_threads=1) -> rotated copy"),
    M(rope_backward, "(dx (N, nh, hd), cos, sin, interleaved=False) -> gradient of the unrotated x"),
    M(swiglu_forward, "(gate, up, n_threads=1) -> silu(gate) * up"),
    M(swiglu_backward, "(dout, gate, up, init=0) -> (dgate, dup)"),
    M(attention_forward, "(q (B,Tq,H,hd), k, v (B,Tk,KVH,hd), key_valid=None, causal=False, q_offset=0, window=0, "
                         "scale=None, n_threads=1, fused=False, kv_capacity=0) -> out (B,Tq,H,hd)"),
    M(attention_forward_lse, "(same as _op_attention_forward) -> (out, lse (B,Tq,H))"),
    M(attention_backward,
      "(dout, out, lse | None, q, k, v, <attention options>, need='qkv', init=0) -> (dq, dk, dv)"),
    M(cross_entropy, "(logits (N,V), targets int32 (N,), dloss_scale=1, grad=True, init=0) -> (losses, dlogits)"),
    M(kl_topk, "(logits (N,V), teacher_probs f16 (N,K+1), teacher_index int32 (N,K), mode, delta=0, "
               "dloss_scale=1, grad=True, init=0) -> (losses, dlogits)"),
    M(sumsq_chunks, "(g (n,), n_threads=1) -> float64 sums of squares per CEPE_NORM_CHUNK chunk"),
    M(scale, "(x, s, n_threads=1) -> x * s"),
    M(adamw, "(p, g, m, v (n,), decay, w1, b2, w2, bc2_sqrt, neg_step, eps, n_threads=1) -> (p, m, v) after one step"),
    M(to_bf16, "(x float32) -> bf16 bits uint16 (NotImplementedError where the table has no bf16)"),
    M(matmul_bf16, "(inp (N, C), weight bf16 bits uint16 (OC, C), init=0) -> out (N, OC)"),
    {"_op_half_to_float", op_half_to_float, METH_O, "(uint16 or float16 array) -> float32, via cepe_half_to_float"},
    {"_op_bf16_round", op_bf16_round, METH_O, "(float32 array) -> bf16 bits uint16, via cepe_float_to_bf16 (host)"},
    {NULL, NULL, 0, NULL},
};
#undef M
#undef BE
