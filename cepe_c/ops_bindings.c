/* ops_bindings.c — the op table (csrc/backend.h) from Python: cepe_c._op runs
 * one op of the list by name on the CPU table or on a "cepe.backend" capsule
 * (cepe_c._sim_backend(), cepe_cuda.backend()). cepe/ops.py is the public,
 * checked API over it; registered into cepe_c by module.c through
 * cepe_ops_methods.
 *
 * _op(name, backend, **args): the arguments are the op's parameters, by their
 * names in the op list:
 *  - a buffer (BUF_W / BUF_R) is None (NULL), an object exporting a
 *    C-contiguous buffer, or (object, offset in bytes): a pointer into one.
 *    An object named by several arguments is one buffer (a fused QKV row
 *    holds q, k and v), so a device backend copies it once each way;
 *  - a host value (HOST) is a number;
 *  - the attention shape (SHAPE) is a tuple of attention_shape's fields, in
 *    the struct's order.
 * On a device backend every buffer is copied to the device first, and those
 * the op writes are copied back after it; the backend's sync turns a failure
 * into RuntimeError carrying its message. The GIL is released around the
 * copies and the op. Shapes are the caller's to check (cepe/ops.py does):
 * this layer only checks that each offset lies inside its buffer. */
#include "bind.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "../csrc/backend.h"
#include "../csrc/ops/elementwise.h"
#include "../csrc/ops/ops.h"
#include "backend_capsule.h"

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

/* Argument i, a buffer: None, obj or (obj, offset in bytes). */
static int take_buffer(op_call *c, int i, PyObject *value) {
    const char *what = c->a.spec[i].name;
    const int out = c->a.spec[i].kind == ARG_W;
    c->which[i] = -1;
    if (value == Py_None) return 0;
    PyObject *obj = value;
    Py_ssize_t bytes = 0;
    if (PyTuple_Check(value) && !PyArg_ParseTuple(value, "On", &obj, &bytes)) return -1;
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
    if (bytes < 0 || bytes > buf->view.len) {
        PyErr_Format(PyExc_ValueError, "%s: offset %zd is outside %s", c->op->name, bytes, what);
        return -1;
    }
    buf->out |= out;
    c->which[i] = b;
    c->offset[i] = bytes;
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
            snprintf(c->msg, sizeof c->msg, "%s", cepe_last_error());
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

/* _op(name, backend, **args) -> None */
static PyObject *op_call_py(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    const char *name;
    PyObject *o_be;
    if (!PyArg_ParseTuple(args, "sO:_op", &name, &o_be)) return NULL;
    op_call c;
    memset(&c, 0, sizeof c);
    const size_t n_ops = sizeof op_table / sizeof op_table[0];
    for (size_t i = 0; i < n_ops && !c.op; i++)
        if (!strcmp(op_table[i].name, name)) c.op = &op_table[i];
    if (!c.op) return PyErr_Format(PyExc_ValueError, "no op named %s in the op list", name);
    c.be = cepe_backend_from_capsule(o_be);
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

PyMethodDef cepe_ops_methods[] = {
    {"_op", (PyCFunction)(void (*)(void))op_call_py, METH_VARARGS | METH_KEYWORDS,
     "_op(name, backend, **args): runs one op of csrc/backend.h's list (cepe.ops is the checked API); "
     "backend None is the CPU table"},
    {"_half_to_float", half_to_float, METH_VARARGS,
     "_half_to_float(src uint16, dst float32): cepe_half_to_float"},
    {"_float_to_bf16", float_to_bf16, METH_VARARGS,
     "_float_to_bf16(src float32, dst uint16): cepe_float_to_bf16"},
    {NULL, NULL, 0, NULL},
};

/* The op list's constants, for cepe.ops. */
int cepe_ops_add_constants(PyObject *m) {
    return PyModule_AddIntConstant(m, "NORM_CHUNK", CEPE_NORM_CHUNK) < 0 ||
                   PyModule_AddIntConstant(m, "IGNORE_INDEX", CEPE_IGNORE_INDEX) < 0 ||
                   PyModule_AddIntConstant(m, "KL_SMOOTH", CEPE_KL_SMOOTH) < 0 ||
                   PyModule_AddIntConstant(m, "KL_DROP", CEPE_KL_DROP) < 0
               ? -1
               : 0;
}
