/* cepe_ops_test.c — the test-only CPython face of the op table
 * (csrc/backend.h). Never installed: tests/ops_ext/__init__.py builds it and
 * wraps each op in a Python function that checks the arrays and makes the
 * outputs.
 *
 * call(op, backend, **args) runs one op of the list through a table: the CPU
 * table (backend None), cepe_c._sim_backend() or cepe_cuda.backend(). The
 * arguments are the op's parameters, by their names in the op list:
 *  - a buffer (BUF_W / BUF_R) is None (NULL), an object exporting a
 *    C-contiguous buffer, or (object, offset in items): a pointer into one.
 *    An object named by several arguments is one buffer (a fused QKV row
 *    holds q, k and v);
 *  - a host value (HOST) is a number;
 *  - the attention shape (SHAPE) is a tuple of attention_shape's fields, in
 *    the struct's order.
 * On a device backend every buffer is copied to the device first, and those
 * the op writes are copied back after it; the backend's sync turns a failure
 * into RuntimeError carrying its message. The GIL is released around the
 * copies and the op.
 *
 * The module does not link the core: it reaches the CPU table and the error
 * message of a failed CPU op through cepe_c's "cepe_c._core_api" capsule. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <string.h>

#include "backend.h"
#include "backend_capsule.h"
#include "ops/elementwise.h"
#include "ops/ops.h"

static const cepe_core_api *core;

/* -------------------------------------------------------------- the op list */

enum { ARG_W, ARG_R, ARG_HOST, ARG_SHAPE };

typedef struct {
    const char *name;
    int kind;
} arg_spec;

#define MAX_ARGS 16

/* One call's arguments in the op list's order, converted from Python. */
typedef struct {
    const arg_spec *spec;
    int n;
    void *ptr[MAX_ARGS];  /* buffers: what the op gets (host or device) */
    double num[MAX_ARGS]; /* host values */
    attention_shape shape;
} op_args;

static int arg_index(const op_args *a, const char *name) {
    for (int i = 0; i < a->n; i++)
        if (!strcmp(a->spec[i].name, name)) return i;
    return 0; /* unreachable: the names come from the same list entry */
}
static void *arg_ptr(const op_args *a, const char *name) { return a->ptr[arg_index(a, name)]; }
static double arg_num(const op_args *a, const char *name) { return a->num[arg_index(a, name)]; }

/* Each op's arguments: names and kinds. */
#define BUF_W(p) {#p, ARG_W}
#define BUF_R(p) {#p, ARG_R}
#define HOST(x) {#x, ARG_HOST}
#define SHAPE(s) {#s, ARG_SHAPE}
#define OP_SPEC(name, params, args) static const arg_spec spec_##name[] = {CEPE_UNPACK args, {NULL, 0}};
CEPE_BACKEND_OPS(OP_SPEC)
#undef BUF_W
#undef BUF_R
#undef HOST
#undef SHAPE

/* Each op called with converted arguments (numbers convert implicitly to the
 * parameter's type, as a C call does). */
#define BUF_W(p) arg_ptr(a, #p)
#define BUF_R(p) arg_ptr(a, #p)
#define HOST(x) arg_num(a, #x)
#define SHAPE(s) (&a->shape)
#define OP_RUN(name, params, args)                                                                           \
    static int has_##name(const cepe_backend *be) { return be->name != NULL; }                               \
    static int run_##name(const cepe_backend *be, const op_args *a) { return be->name(be, CEPE_UNPACK args); }
CEPE_BACKEND_OPS(OP_RUN)
#undef BUF_W
#undef BUF_R
#undef HOST
#undef SHAPE

typedef struct {
    const char *name;
    const arg_spec *spec;
    int (*has)(const cepe_backend *be);
    int (*run)(const cepe_backend *be, const op_args *a);
} op_entry;

#define OP_ENTRY(name, params, args) {#name, spec_##name, has_##name, run_##name},
static const op_entry op_table[] = {CEPE_BACKEND_OPS(OP_ENTRY)};

/* ------------------------------------------------------------ the arguments */

typedef struct {
    Py_buffer view; /* the host memory */
    void *dev;      /* its device copy, or NULL */
    int out;        /* written by the op: copied back */
} op_buffer;

typedef struct {
    const cepe_backend *be;
    const op_entry *op;
    op_args a;
    op_buffer buf[MAX_ARGS];
    int n_buf;
    int which[MAX_ARGS];         /* per buffer argument: index into buf, -1 for NULL */
    Py_ssize_t offset[MAX_ARGS]; /* bytes into it */
    int failed;                  /* a copy failed: the op must not run */
    int status;                  /* after the run: 0 or a CEPE_ERR_* */
    char msg[512];
} op_call;

static void release(op_call *c) {
    for (int i = 0; i < c->n_buf; i++) PyBuffer_Release(&c->buf[i].view);
    c->n_buf = 0;
}

/* Argument i, a buffer: None, obj or (obj, offset in items). */
static int take_buffer(op_call *c, int i, PyObject *value) {
    const char *what = c->a.spec[i].name;
    const int out = c->a.spec[i].kind == ARG_W;
    c->which[i] = -1;
    if (value == Py_None) return 0;
    PyObject *obj = value;
    Py_ssize_t items = 0;
    if (PyTuple_Check(value) && !PyArg_ParseTuple(value, "On", &obj, &items)) return -1;
    int b = 0;
    while (b < c->n_buf && c->buf[b].view.obj != obj) b++;
    if (b == c->n_buf) {
        if (PyObject_GetBuffer(obj, &c->buf[b].view, PyBUF_C_CONTIGUOUS) < 0) return -1;
        c->buf[b].dev = NULL;
        c->buf[b].out = 0;
        c->n_buf++;
    }
    op_buffer *buf = &c->buf[b];
    if (out && buf->view.readonly) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be writeable", c->op->name, what);
        return -1;
    }
    if (items < 0 || items > buf->view.len / buf->view.itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: offset %zd is outside %s", c->op->name, items, what);
        return -1;
    }
    buf->out |= out;
    c->which[i] = b;
    c->offset[i] = items * buf->view.itemsize;
    return 0;
}

/* attention_shape from a tuple of its fields, in the struct's order. */
static int take_shape(attention_shape *s, PyObject *t) {
    memset(s, 0, sizeof *s);
    if (!PyTuple_Check(t)) {
        PyErr_SetString(PyExc_TypeError, "the attention shape must be a tuple of attention_shape's fields");
        return -1;
    }
    return PyArg_ParseTuple(t, "iiiiiillllliiif:attention shape", &s->B, &s->Tq, &s->Tk, &s->H, &s->KVH,
                            &s->hd, &s->q_rstride, &s->q_bstride, &s->kv_rstride, &s->kv_bstride,
                            &s->valid_bstride, &s->causal, &s->q_offset, &s->window, &s->scale)
               ? 0
               : -1;
}

/* ---------------------------------------------------------------- the run */

/* Without the GIL: device copies, the op, copies back, sync. */
static void run(op_call *c) {
    const cepe_backend *be = c->be;
    for (int b = 0; b < c->n_buf && be->device && !c->failed; b++) {
        const size_t bytes = (size_t)c->buf[b].view.len;
        if (!(c->buf[b].dev = be->alloc(be, bytes))) {
            c->failed = 1;
            snprintf(c->msg, sizeof c->msg, "cannot allocate %zu bytes on the device", bytes);
        } else if (bytes && be->upload(be, c->buf[b].dev, c->buf[b].view.buf, bytes)) {
            c->failed = 1; /* the message comes from sync */
        }
    }
    for (int i = 0; i < c->a.n; i++) {
        if (c->a.spec[i].kind != ARG_W && c->a.spec[i].kind != ARG_R) continue;
        const op_buffer *buf = c->which[i] < 0 ? NULL : &c->buf[c->which[i]];
        char *base = !buf ? NULL : be->device ? buf->dev : buf->view.buf;
        c->a.ptr[i] = base ? base + c->offset[i] : NULL;
    }
    const int st = c->failed ? 0 : c->op->run(be, &c->a);
    if (!be->device) {
        if (st) {
            c->status = st;
            snprintf(c->msg, sizeof c->msg, "%s", core->last_error());
        }
        return;
    }
    int ok = !c->failed && !st;
    for (int b = 0; b < c->n_buf; b++) {
        op_buffer *buf = &c->buf[b];
        if (ok && buf->out && buf->view.len &&
            be->download(be, buf->view.buf, buf->dev, (size_t)buf->view.len))
            ok = 0;
    }
    for (int b = 0; b < c->n_buf; b++) be->free(be, c->buf[b].dev);
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

/* call(op, backend, **args) -> None */
static PyObject *call(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    const char *name;
    PyObject *o_be;
    if (!PyArg_ParseTuple(args, "sO:call", &name, &o_be)) return NULL;
    op_call c;
    memset(&c, 0, sizeof c);
    const size_t n_ops = sizeof op_table / sizeof op_table[0];
    for (size_t i = 0; i < n_ops && !c.op; i++)
        if (!strcmp(op_table[i].name, name)) c.op = &op_table[i];
    if (!c.op) return PyErr_Format(PyExc_ValueError, "no op named %s in the op list", name);
    c.be = o_be == Py_None ? core->backend_cpu() : cepe_backend_capsule_table(o_be);
    if (!c.be) return NULL;
    if (!c.op->has(c.be))
        return PyErr_Format(PyExc_NotImplementedError, "backend '%s' has no %s op", c.be->name, name);
    c.a.spec = c.op->spec;
    while (c.a.spec[c.a.n].name) c.a.n++;
    if ((kwds ? PyDict_Size(kwds) : 0) != c.a.n)
        return PyErr_Format(PyExc_TypeError, "%s takes %d named arguments, got %zd", name, c.a.n,
                            kwds ? PyDict_Size(kwds) : 0);
    for (int i = 0; i < c.a.n; i++) {
        const arg_spec *spec = &c.a.spec[i];
        PyObject *value = PyDict_GetItemString(kwds, spec->name); /* borrowed */
        if (!value) {
            PyErr_Format(PyExc_TypeError, "%s: missing argument %s", name, spec->name);
            goto fail;
        }
        if (spec->kind == ARG_W || spec->kind == ARG_R) {
            if (take_buffer(&c, i, value) < 0) goto fail;
        } else if (spec->kind == ARG_SHAPE) {
            if (take_shape(&c.a.shape, value) < 0) goto fail;
        } else if ((c.a.num[i] = PyFloat_AsDouble(value)) == -1.0 && PyErr_Occurred()) {
            goto fail;
        }
    }
    Py_BEGIN_ALLOW_THREADS run(&c);
    Py_END_ALLOW_THREADS release(&c);
    if (c.status)
        return PyErr_Format(PyExc_RuntimeError, "%s on backend '%s' failed (status %d): %s", name, c.be->name,
                            c.status, c.msg);
    Py_RETURN_NONE;
fail:
    release(&c);
    return NULL;
}

/* ------------------------------------------------------ host conversions */

/* The host functions the CUDA kernels share (CEPE_HD headers): src -> dst,
 * elementwise, over two C-contiguous buffers of n items each. */
static PyObject *convert(PyObject *args, const char *fmt, size_t src_size, size_t dst_size, int bf16) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, fmt, &src, &dst)) return NULL;
    PyObject *ret = NULL;
    const Py_ssize_t n = src.len / (Py_ssize_t)src_size;
    if (!PyBuffer_IsContiguous(&src, 'C') || !PyBuffer_IsContiguous(&dst, 'C') ||
        src.itemsize != (Py_ssize_t)src_size || dst.itemsize != (Py_ssize_t)dst_size ||
        dst.len / (Py_ssize_t)dst_size != n) {
        PyErr_SetString(PyExc_ValueError,
                        "src and dst must be C-contiguous, of the item sizes and one length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (bf16)
            ((uint16_t *)dst.buf)[i] = cepe_float_to_bf16(((const float *)src.buf)[i]);
        else
            ((float *)dst.buf)[i] = cepe_half_to_float(((const uint16_t *)src.buf)[i]);
    ret = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

static PyObject *half_to_float(PyObject *Py_UNUSED(m), PyObject *args) {
    return convert(args, "y*w*:half_to_float", sizeof(uint16_t), sizeof(float), 0);
}

static PyObject *float_to_bf16(PyObject *Py_UNUSED(m), PyObject *args) {
    return convert(args, "y*w*:float_to_bf16", sizeof(float), sizeof(uint16_t), 1);
}

/* ----------------------------------------------------------------- module */

static PyMethodDef methods[] = {
    {"call", (PyCFunction)(void (*)(void))call, METH_VARARGS | METH_KEYWORDS,
     "call(op, backend, **args): runs one op of csrc/backend.h's list; backend None is the CPU table"},
    {"half_to_float", half_to_float, METH_VARARGS,
     "half_to_float(src uint16, dst float32): cepe_half_to_float"},
    {"float_to_bf16", float_to_bf16, METH_VARARGS,
     "float_to_bf16(src float32, dst uint16): cepe_float_to_bf16"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT,
                                    "cepe_ops_test",
                                    "test-only bindings of the op table",
                                    -1,
                                    methods,
                                    NULL,
                                    NULL,
                                    NULL,
                                    NULL};

PyMODINIT_FUNC PyInit_cepe_ops_test(void) {
    core = PyCapsule_Import(CEPE_CORE_API_CAPSULE, 0);
    if (!core) return NULL;
    if (core->abi != CEPE_BACKEND_ABI)
        return PyErr_Format(PyExc_ImportError, "cepe_c has op table ABI %d, these bindings %d: rebuild",
                            core->abi, CEPE_BACKEND_ABI);
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "NORM_CHUNK", CEPE_NORM_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "IGNORE_INDEX", CEPE_IGNORE_INDEX) < 0 ||
        PyModule_AddIntConstant(m, "KL_SMOOTH", CEPE_KL_SMOOTH) < 0 ||
        PyModule_AddIntConstant(m, "KL_DROP", CEPE_KL_DROP) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
