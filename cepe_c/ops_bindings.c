/* ops_bindings.c — test-only CPython face of the CPU ops (csrc/ops/), forward
 * and backward, so tests/test_ops.py can check each against PyTorch. Every
 * function is named _op_<c function> (the underscore: not a public API) and
 * registered into cepe_c by module.c through cepe_ops_methods.
 *
 * Arguments are NumPy arrays of the exact dtype, C-contiguous, aligned and in
 * native byte order (no silent conversion: a test passing the wrong thing
 * should fail loudly); shapes are checked against each other. Outputs are new
 * arrays, zero-filled before the call, so the ops' accumulate-into-gradient
 * convention reads as plain outputs here. The GIL is released around every
 * C call. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../csrc/ops/ops.h"
#include "../csrc/ops/ops_backward.h"
#include "../csrc/ops/elementwise_backward.h"

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

#define KW(...) static char *kw[] = {__VA_ARGS__, NULL}

/* ------------------------------------------------------------------ embedding */

static PyObject *op_embedding_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("ids", "wte");
    PyObject *o_ids, *o_wte;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kw, &o_ids, &o_wte) || numpy_ready() < 0) return NULL;
    PyArrayObject *ids = arr(o_ids, "ids", NPY_INT32, NPY_NOTYPE, 1);
    PyArrayObject *wte = ids ? arr(o_wte, "wte", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    if (!wte || ids_ok(ids, PyArray_DIM(wte, 0)) < 0) return NULL;
    const int N = (int)PyArray_DIM(ids, 0), C = (int)PyArray_DIM(wte, 1);
    npy_intp dims[2] = {N, C};
    PyArrayObject *out = zeros(2, dims);
    if (!out) return NULL;
    Py_BEGIN_ALLOW_THREADS
    embedding_forward(F(out), (const int32_t *)PyArray_DATA(ids), F(wte), N, C);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

static PyObject *op_embedding_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "ids", "V");
    PyObject *o_dout, *o_ids;
    int V;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOi", kw, &o_dout, &o_ids, &V) || numpy_ready() < 0) return NULL;
    PyArrayObject *dout = arr(o_dout, "dout", NPY_FLOAT32, NPY_NOTYPE, 2);
    PyArrayObject *ids = dout ? arr(o_ids, "ids", NPY_INT32, NPY_NOTYPE, 1) : NULL;
    if (!ids || dim_is(ids, "ids", 0, PyArray_DIM(dout, 0)) < 0 || ids_ok(ids, V) < 0) return NULL;
    const int N = (int)PyArray_DIM(dout, 0), C = (int)PyArray_DIM(dout, 1);
    npy_intp dims[2] = {V, C};
    PyArrayObject *dwte = zeros(2, dims);
    if (!dwte) return NULL;
    Py_BEGIN_ALLOW_THREADS
    embedding_backward(F(dwte), F(dout), (const int32_t *)PyArray_DATA(ids), N, C);
    Py_END_ALLOW_THREADS
    return (PyObject *)dwte;
}

/* -------------------------------------------------------------------- rmsnorm */

static PyObject *op_rmsnorm_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("inp", "weight", "eps", "n_threads");
    PyObject *o_inp, *o_w;
    float eps;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOf|i", kw, &o_inp, &o_w, &eps, &n_threads) || numpy_ready() < 0 ||
        threads_ok(n_threads) < 0)
        return NULL;
    PyArrayObject *inp = arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2);
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    if (!w || dim_is(w, "weight", 0, PyArray_DIM(inp, 1)) < 0) return NULL;
    PyArrayObject *out = zeros(2, PyArray_DIMS(inp));
    if (!out) return NULL;
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1);
    Py_BEGIN_ALLOW_THREADS
    rmsnorm_forward(F(out), F(inp), F(w), N, C, eps, n_threads);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

static PyObject *op_rmsnorm_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "inp", "weight", "eps", "dweight");
    PyObject *o_dout, *o_inp, *o_w;
    float eps;
    int want_dw = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOf|p", kw, &o_dout, &o_inp, &o_w, &eps, &want_dw) ||
        numpy_ready() < 0)
        return NULL;
    PyArrayObject *dout = arr(o_dout, "dout", NPY_FLOAT32, NPY_NOTYPE, 2);
    PyArrayObject *inp = dout ? arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_FLOAT32, NPY_NOTYPE, 1) : NULL;
    if (!w || same_shape(dout, inp, "dout") < 0 || dim_is(w, "weight", 0, PyArray_DIM(inp, 1)) < 0) return NULL;
    PyArrayObject *dinp = zeros(2, PyArray_DIMS(inp)), *dw = want_dw ? zeros(1, PyArray_DIMS(w)) : NULL;
    if (!dinp || (want_dw && !dw)) goto fail;
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1);
    Py_BEGIN_ALLOW_THREADS
    rmsnorm_backward(F(dinp), F(dw), F(dout), F(inp), F(w), N, C, eps);
    Py_END_ALLOW_THREADS
    if (!dw) return Py_BuildValue("(NO)", dinp, Py_None);
    return Py_BuildValue("(NN)", dinp, dw);
fail:
    Py_XDECREF(dinp);
    Py_XDECREF(dw);
    return NULL;
}

/* --------------------------------------------------------------------- matmul */

static PyObject *op_matmul_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("inp", "weight", "n_threads");
    PyObject *o_inp, *o_w;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|i", kw, &o_inp, &o_w, &n_threads) || numpy_ready() < 0 ||
        threads_ok(n_threads) < 0)
        return NULL;
    PyArrayObject *inp = arr(o_inp, "inp", NPY_FLOAT32, NPY_NOTYPE, 2);
    PyArrayObject *w = inp ? arr(o_w, "weight", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    if (!w || dim_is(w, "weight", 1, PyArray_DIM(inp, 1)) < 0) return NULL;
    const int N = (int)PyArray_DIM(inp, 0), C = (int)PyArray_DIM(inp, 1), OC = (int)PyArray_DIM(w, 0);
    npy_intp dims[2] = {N, OC};
    PyArrayObject *out = zeros(2, dims);
    if (!out) return NULL;
    Py_BEGIN_ALLOW_THREADS
    matmul_forward(F(out), F(inp), F(w), N, C, OC, 0, n_threads);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

/* dinp_into: an existing (N, C) array that receives dinp with accumulate = 1
 * (tests the flag); otherwise a new array with accumulate = 0. */
static PyObject *op_matmul_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "inp", "weight", "dinp", "dweight", "dinp_into", "n_threads");
    PyObject *o_dout, *o_inp, *o_w, *o_into = Py_None;
    int want_dinp = 1, want_dw = 1, n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|ppOi", kw, &o_dout, &o_inp, &o_w, &want_dinp, &want_dw, &o_into,
                                     &n_threads) ||
        numpy_ready() < 0 || threads_ok(n_threads) < 0)
        return NULL;
    PyArrayObject *dout = arr(o_dout, "dout", NPY_FLOAT32, NPY_NOTYPE, 2);
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
    Py_BEGIN_ALLOW_THREADS
    matmul_backward(F(dinp), F(dw), F(dout), F(inp), F(w), N, C, OC, accumulate, n_threads);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", dinp ? (PyObject *)dinp : Py_NewRef(Py_None), dw ? (PyObject *)dw : Py_NewRef(Py_None));
fail:
    Py_XDECREF(dinp);
    Py_XDECREF(dw);
    return NULL;
}

/* ----------------------------------------------------------------------- rope */

/* x (N, nh, hd) copied and rotated (backward = 0) or back-rotated (1). */
static PyObject *rope_common(PyObject *args, PyObject *kwds, int backward) {
    KW("x", "cos", "sin", "interleaved", "n_threads");
    PyObject *o_x, *o_c, *o_s;
    int interleaved = 0, n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|pi", kw, &o_x, &o_c, &o_s, &interleaved, &n_threads) ||
        numpy_ready() < 0 || threads_ok(n_threads) < 0)
        return NULL;
    PyArrayObject *x = arr(o_x, "x", NPY_FLOAT32, NPY_NOTYPE, 3);
    PyArrayObject *c = x ? arr(o_c, "cos", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    PyArrayObject *s = c ? arr(o_s, "sin", NPY_FLOAT32, NPY_NOTYPE, 2) : NULL;
    if (!s || dim_is(c, "cos", 0, PyArray_DIM(x, 0)) < 0 || same_shape(s, c, "sin") < 0) return NULL;
    const int N = (int)PyArray_DIM(x, 0), nh = (int)PyArray_DIM(x, 1), hd = (int)PyArray_DIM(x, 2);
    const int half = (int)PyArray_DIM(c, 1);
    if (2 * half > hd) return PyErr_Format(PyExc_ValueError, "cos has %d pairs but head_dim is %d", half, hd);
    PyArrayObject *y = (PyArrayObject *)PyArray_NewCopy(x, NPY_CORDER);
    if (!y) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (backward)
        rope_backward(F(y), F(c), F(s), N, nh, hd, half, interleaved);
    else
        rope_forward(F(y), F(c), F(s), N, nh, hd, half, interleaved, n_threads);
    Py_END_ALLOW_THREADS
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
    KW("gate", "up", "n_threads");
    PyObject *o_g, *o_u;
    int n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|i", kw, &o_g, &o_u, &n_threads) || numpy_ready() < 0 ||
        threads_ok(n_threads) < 0)
        return NULL;
    PyArrayObject *g = arr(o_g, "gate", NPY_FLOAT32, NPY_NOTYPE, -1);
    PyArrayObject *u = g ? arr(o_u, "up", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    if (!u || same_shape(u, g, "up") < 0) return NULL;
    PyArrayObject *out = zeros(PyArray_NDIM(g), PyArray_DIMS(g));
    if (!out) return NULL;
    Py_BEGIN_ALLOW_THREADS
    swiglu_forward(F(out), F(g), F(u), (long)PyArray_SIZE(g), n_threads);
    Py_END_ALLOW_THREADS
    return (PyObject *)out;
}

static PyObject *op_swiglu_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "gate", "up");
    PyObject *o_d, *o_g, *o_u;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kw, &o_d, &o_g, &o_u) || numpy_ready() < 0) return NULL;
    PyArrayObject *d = arr(o_d, "dout", NPY_FLOAT32, NPY_NOTYPE, -1);
    PyArrayObject *g = d ? arr(o_g, "gate", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    PyArrayObject *u = g ? arr(o_u, "up", NPY_FLOAT32, NPY_NOTYPE, -1) : NULL;
    if (!u || same_shape(g, d, "gate") < 0 || same_shape(u, d, "up") < 0) return NULL;
    PyArrayObject *dg = zeros(PyArray_NDIM(g), PyArray_DIMS(g)), *du = zeros(PyArray_NDIM(g), PyArray_DIMS(g));
    if (!dg || !du) {
        Py_XDECREF(dg);
        Py_XDECREF(du);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    swiglu_backward(F(dg), F(du), F(d), F(g), F(u), (long)PyArray_SIZE(g));
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(NN)", dg, du);
}

/* ------------------------------------------------------------------ attention */

/* Parsed attention arguments. With fused = 1, q, k, v are packed into one
 * (B, T, H + 2*KVH, hd) buffer (as a fused QKV projection writes them) so
 * the ops run with row strides wider than a row: the layout model code uses. */
typedef struct {
    attention_shape s;
    PyArrayObject *q, *k, *v, *valid; /* borrowed */
    int fused, n_threads;
    float *qkv;                   /* fused copy (malloc), or NULL */
    const float *qp, *kp, *vp;    /* what the ops read */
} att_args;

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
    attention_shape s = {B, Tq, Tk, H, KVH, hd};
    s.causal = causal;
    s.q_offset = q_offset;
    s.window = window;
    s.scale = (float)scale;
    s.valid_bstride = Tk;
    a->qkv = NULL;
    if (a->fused) {
        if (Tq != Tk) {
            PyErr_SetString(PyExc_ValueError, "fused=True needs Tq == Tk (self-attention)");
            return -1;
        }
        const long W = (long)(H + 2 * KVH) * hd, rows = (long)B * Tq;
        a->qkv = malloc(sizeof(float) * (size_t)(rows * W));
        if (!a->qkv) {
            PyErr_NoMemory();
            return -1;
        }
        for (long r = 0; r < rows; r++) {
            memcpy(a->qkv + r * W, F(a->q) + r * H * hd, sizeof(float) * (size_t)(H * hd));
            memcpy(a->qkv + r * W + (long)H * hd, F(a->k) + r * KVH * hd, sizeof(float) * (size_t)(KVH * hd));
            memcpy(a->qkv + r * W + (long)(H + KVH) * hd, F(a->v) + r * KVH * hd, sizeof(float) * (size_t)(KVH * hd));
        }
        s.q_rstride = s.kv_rstride = W;
        s.q_bstride = s.kv_bstride = (long)Tq * W;
        a->qp = a->qkv;
        a->kp = a->qkv + (long)H * hd;
        a->vp = a->qkv + (long)(H + KVH) * hd;
    } else {
        s.q_rstride = (long)H * hd;
        s.q_bstride = (long)Tq * H * hd;
        s.kv_rstride = (long)KVH * hd;
        s.kv_bstride = (long)Tk * KVH * hd;
        a->qp = F(a->q);
        a->kp = F(a->k);
        a->vp = F(a->v);
    }
    a->s = s;
    return 0;
}

static const uint8_t *att_valid(const att_args *a) {
    return a->valid ? (const uint8_t *)PyArray_DATA(a->valid) : NULL;
}

#define ATT_KW "q", "k", "v", "key_valid", "causal", "q_offset", "window", "scale", "n_threads", "fused"

/* with_lse = 0: attention_forward -> out; 1: attention_forward_lse -> (out, lse). */
static PyObject *attention_fwd_common(PyObject *args, PyObject *kwds, int with_lse) {
    KW(ATT_KW);
    PyObject *o_q, *o_k, *o_v, *o_valid = Py_None, *o_scale = Py_None;
    int causal = 0, q_offset = 0, window = 0;
    att_args a = {0};
    a.n_threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OpiiOip", kw, &o_q, &o_k, &o_v, &o_valid, &causal, &q_offset,
                                     &window, &o_scale, &a.n_threads, &a.fused) ||
        numpy_ready() < 0)
        return NULL;
    if (att_setup(&a, o_q, o_k, o_v, o_valid, causal, q_offset, window, o_scale) < 0) {
        free(a.qkv);
        return NULL;
    }
    PyArrayObject *out = zeros(4, PyArray_DIMS(a.q)), *lse = NULL;
    if (with_lse) lse = zeros(3, PyArray_DIMS(a.q));
    if (!out || (with_lse && !lse)) {
        Py_XDECREF(out);
        Py_XDECREF(lse);
        free(a.qkv);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (with_lse)
        attention_forward_lse(F(out), F(lse), a.qp, a.kp, a.vp, att_valid(&a), &a.s, a.n_threads);
    else
        attention_forward(F(out), a.qp, a.kp, a.vp, att_valid(&a), &a.s, a.n_threads);
    Py_END_ALLOW_THREADS
    free(a.qkv);
    if (!with_lse) return (PyObject *)out;
    return Py_BuildValue("(NN)", out, lse);
}

static PyObject *op_attention_forward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    return attention_fwd_common(args, kwds, 0);
}

static PyObject *op_attention_forward_lse(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    return attention_fwd_common(args, kwds, 1);
}

/* (dq, dk, dv); `need` names the gradients to compute ("qkv", "kv", "q", ...),
 * the others are passed to C as NULL and returned as None. */
static PyObject *op_attention_backward(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("dout", "out", "lse", ATT_KW, "need");
    PyObject *o_dout, *o_out, *o_lse, *o_q, *o_k, *o_v, *o_valid = Py_None, *o_scale = Py_None;
    int causal = 0, q_offset = 0, window = 0, st = 0;
    const char *need = "qkv";
    att_args a = {0};
    a.n_threads = 1;
    PyArrayObject *dq = NULL, *dk = NULL, *dv = NULL;
    float *dqkv = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO|OpiiOips", kw, &o_dout, &o_out, &o_lse, &o_q, &o_k, &o_v,
                                     &o_valid, &causal, &q_offset, &window, &o_scale, &a.n_threads, &a.fused, &need) ||
        numpy_ready() < 0)
        return NULL;
    if (att_setup(&a, o_q, o_k, o_v, o_valid, causal, q_offset, window, o_scale) < 0) goto fail;
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
    float *pdq = F(dq), *pdk = F(dk), *pdv = F(dv);
    const attention_shape *s = &a.s;
    const long W = (long)(s->H + 2 * s->KVH) * s->hd, rows = (long)s->B * s->Tq;
    if (a.fused) { /* gradients land in a fused buffer laid out like qkv */
        dqkv = calloc((size_t)(rows * W), sizeof(float));
        if (!dqkv) {
            PyErr_NoMemory();
            goto fail;
        }
        pdq = want_q ? dqkv : NULL;
        pdk = want_k ? dqkv + (long)s->H * s->hd : NULL;
        pdv = want_v ? dqkv + (long)(s->H + s->KVH) * s->hd : NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    st = attention_backward(pdq, pdk, pdv, F(dout), a.qp, a.kp, a.vp, F(out), F(lse), att_valid(&a), s, a.n_threads);
    Py_END_ALLOW_THREADS
    if (st) {
        PyErr_NoMemory();
        goto fail;
    }
    if (a.fused) {
        const long hq = (long)s->H * s->hd, hkv = (long)s->KVH * s->hd;
        for (long r = 0; r < rows; r++) {
            if (dq) memcpy(F(dq) + r * hq, dqkv + r * W, sizeof(float) * (size_t)hq);
            if (dk) memcpy(F(dk) + r * hkv, dqkv + r * W + hq, sizeof(float) * (size_t)hkv);
            if (dv) memcpy(F(dv) + r * hkv, dqkv + r * W + hq + hkv, sizeof(float) * (size_t)hkv);
        }
    }
    free(dqkv);
    free(a.qkv);
    return Py_BuildValue("(NNN)", dq ? (PyObject *)dq : Py_NewRef(Py_None), dk ? (PyObject *)dk : Py_NewRef(Py_None),
                         dv ? (PyObject *)dv : Py_NewRef(Py_None));
fail:
    Py_XDECREF(dq);
    Py_XDECREF(dk);
    Py_XDECREF(dv);
    free(dqkv);
    free(a.qkv);
    return NULL;
}

/* --------------------------------------------------------------------- losses */

static PyObject *op_cross_entropy(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("logits", "targets", "dloss_scale", "grad");
    PyObject *o_z, *o_t;
    float scale = 1.0f;
    int grad = 1, st = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|fp", kw, &o_z, &o_t, &scale, &grad) || numpy_ready() < 0)
        return NULL;
    PyArrayObject *z = arr(o_z, "logits", NPY_FLOAT32, NPY_NOTYPE, 2);
    PyArrayObject *t = z ? arr(o_t, "targets", NPY_INT32, NPY_NOTYPE, 1) : NULL;
    if (!t || dim_is(t, "targets", 0, PyArray_DIM(z, 0)) < 0) return NULL;
    const int N = (int)PyArray_DIM(z, 0), V = (int)PyArray_DIM(z, 1);
    npy_intp n = N;
    PyArrayObject *losses = zeros(1, &n), *dz = grad ? zeros(2, PyArray_DIMS(z)) : NULL;
    if (!losses || (grad && !dz)) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = cross_entropy_forward_backward(F(losses), F(dz), F(z), (const int32_t *)PyArray_DATA(t), N, V, scale);
    Py_END_ALLOW_THREADS
    if (st) {
        PyErr_Format(PyExc_ValueError, "targets must be in [0, %d) or %d", V, CEPE_IGNORE_INDEX);
        goto fail;
    }
    return Py_BuildValue("(NN)", losses, dz ? (PyObject *)dz : Py_NewRef(Py_None));
fail:
    Py_XDECREF(losses);
    Py_XDECREF(dz);
    return NULL;
}

static PyObject *op_kl_topk(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    KW("logits", "teacher_probs", "teacher_index", "mode", "delta", "dloss_scale", "grad");
    PyObject *o_z, *o_p, *o_i;
    int mode, grad = 1, st = 0;
    float delta = 0.0f, scale = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOi|ffp", kw, &o_z, &o_p, &o_i, &mode, &delta, &scale, &grad) ||
        numpy_ready() < 0)
        return NULL;
    PyArrayObject *z = arr(o_z, "logits", NPY_FLOAT32, NPY_NOTYPE, 2);
    PyArrayObject *p = z ? arr(o_p, "teacher_probs", NPY_FLOAT16, NPY_UINT16, 2) : NULL;
    PyArrayObject *ix = p ? arr(o_i, "teacher_index", NPY_INT32, NPY_NOTYPE, 2) : NULL;
    if (!ix) return NULL;
    const int N = (int)PyArray_DIM(z, 0), V = (int)PyArray_DIM(z, 1), K = (int)PyArray_DIM(ix, 1);
    if (dim_is(ix, "teacher_index", 0, N) < 0 || dim_is(p, "teacher_probs", 0, N) < 0 ||
        dim_is(p, "teacher_probs", 1, (npy_intp)K + 1) < 0)
        return NULL;
    npy_intp n = N;
    PyArrayObject *losses = zeros(1, &n), *dz = grad ? zeros(2, PyArray_DIMS(z)) : NULL;
    if (!losses || (grad && !dz)) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = kl_topk_forward_backward(F(losses), F(dz), F(z), (const uint16_t *)PyArray_DATA(p),
                                  (const int32_t *)PyArray_DATA(ix), N, V, K, mode, delta, scale);
    Py_END_ALLOW_THREADS
    if (st) {
        PyErr_Format(PyExc_ValueError,
                     "kl_topk: mode must be %d (smooth, delta >= 0) or %d (drop), K >= 1, teacher_index in [0, %d)",
                     CEPE_KL_SMOOTH, CEPE_KL_DROP, V);
        goto fail;
    }
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

/* ---------------------------------------------------------------------- table */

#define M(name, doc) {"_op_" #name, (PyCFunction)(void (*)(void))op_##name, METH_VARARGS | METH_KEYWORDS, doc}
PyMethodDef cepe_ops_methods[] = {
    M(embedding_forward, "(ids int32 (N,), wte (V, C)) -> out (N, C)"),
    M(embedding_backward, "(dout (N, C), ids (N,), V) -> dwte (V, C)"),
    M(rmsnorm_forward, "(inp (N, C), weight (C,), eps, n_threads=1) -> out"),
    M(rmsnorm_backward, "(dout, inp, weight, eps, dweight=True) -> (dinp, dweight | None)"),
    M(matmul_forward, "(inp (N, C), weight (OC, C), n_threads=1) -> out (N, OC)"),
    M(matmul_backward, "(dout, inp, weight, dinp=True, dweight=True, dinp_into=None, n_threads=1) -> (dinp, dweight)"),
    M(rope_forward, "(x (N, nh, hd), cos (N, half), sin, interleaved=False, n_threads=1) -> rotated copy"),
    M(rope_backward, "(dx (N, nh, hd), cos, sin, interleaved=False) -> gradient of the unrotated x"),
    M(swiglu_forward, "(gate, up, n_threads=1) -> silu(gate) * up"),
    M(swiglu_backward, "(dout, gate, up) -> (dgate, dup)"),
    M(attention_forward, "(q (B,Tq,H,hd), k, v (B,Tk,KVH,hd), key_valid=None, causal=False, q_offset=0, window=0, "
                         "scale=None, n_threads=1, fused=False) -> out (B,Tq,H,hd)"),
    M(attention_forward_lse, "(same as _op_attention_forward) -> (out, lse (B,Tq,H))"),
    M(attention_backward, "(dout, out, lse | None, q, k, v, <attention options>, need='qkv') -> (dq, dk, dv)"),
    M(cross_entropy, "(logits (N,V), targets int32 (N,), dloss_scale=1, grad=True) -> (losses, dlogits)"),
    M(kl_topk, "(logits (N,V), teacher_probs f16 (N,K+1), teacher_index int32 (N,K), mode, delta=0, "
               "dloss_scale=1, grad=True) -> (losses, dlogits)"),
    {"_op_half_to_float", op_half_to_float, METH_O, "(uint16 or float16 array) -> float32, via cepe_half_to_float"},
    {NULL, NULL, 0, NULL},
};
#undef M
