/* cepe_c — the thin CPython face of the C core.
 *
 * It checks arguments, hands NumPy buffers to the core without copying,
 * releases the GIL around every call that computes, and turns cepe_status
 * codes into Python exceptions. Everything user-friendly (dtype conversion,
 * 1-D inputs, config files) lives in the pure-Python package `cepe`.
 *
 * Thread-safety: a Model is immutable after finalize() and may be shared by
 * threads. A Context is per-request state: one call at a time; a second
 * concurrent call raises RuntimeError instead of corrupting its cache. A
 * Context holds a reference to its Model, and a Model to every weight
 * array, so nothing is freed while still in use. */
#define CEPE_C_IMPORTS_NUMPY /* PyInit_cepe_c imports the shared NumPy API table */
#include "bind.h"

#include <limits.h>

#include "../csrc/cepe.h"
#include "../csrc/quant/quant.h"
#include "backend_capsule.h"

/* rope_bindings.c: rope_frequencies, e2llm_positions. */
extern PyMethodDef cepe_rope_methods[];
/* train_bindings.c: optimizer pieces and the CEPE training state. */
extern PyMethodDef cepe_train_methods[];
/* ops_bindings.c: the op table by name (cepe.ops) and its constants. */
extern PyMethodDef cepe_ops_methods[];
int cepe_ops_add_constants(PyObject *m);

/* ------------------------------------------------------------------ errors */

PyObject *raise_status(cepe_status st) {
    PyObject *type = PyExc_RuntimeError;
    switch (st) {
    case CEPE_ERR_INVALID_ARG:
    case CEPE_ERR_NUMERIC:
        type = PyExc_ValueError;
        break;
    case CEPE_ERR_OUT_OF_MEMORY:
        type = PyExc_MemoryError;
        break;
    case CEPE_ERR_MISSING_WEIGHT:
        type = PyExc_KeyError;
        break;
    case CEPE_ERR_UNSUPPORTED:
        type = PyExc_NotImplementedError;
        break;
    case CEPE_ERR_INTERRUPTED:
        type = PyExc_KeyboardInterrupt;
        break;
    default:
        break;
    }
    if (st == CEPE_ERR_MISSING_WEIGHT) /* KeyError would repr() the message */
        PyErr_SetObject(type, PyUnicode_FromString(cepe_last_error()));
    else
        PyErr_SetString(type, cepe_last_error());
    return NULL;
}

/* ------------------------------------------------------------------- Model */

static void Model_dealloc(ModelObject *self) {
    cepe_model_free(self->model); /* before its backend goes */
    Py_XDECREF(self->weights);
    Py_XDECREF(self->backend);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Reads a config dict's keys (those of cepe.config.DecoderConfig.core_kwargs);
 * keep[] as rope_config_from_dict's. */
static int config_from_dict(PyObject *d, cepe_config *c, const char *what, PyObject *keep[2]) {
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "%s must be a dict", what);
        return -1;
    }
    struct {
        const char *key;
        int *dst;
        int required;
    } ints[] = {
        {"vocab_size", &c->vocab_size, 1},
        {"hidden_size", &c->hidden_size, 1},
        {"intermediate_size", &c->intermediate_size, 1},
        {"num_hidden_layers", &c->n_layers, 1},
        {"num_attention_heads", &c->n_heads, 1},
        {"num_key_value_heads", &c->n_kv_heads, 1},
        {"head_dim", &c->head_dim, 1},
        {"tie_word_embeddings", &c->tie_word_embeddings, 0},
        {"sliding_window", &c->sliding_window, 0},
        {"num_cross_attn_layers", &c->n_cross_layers, 0},
        {"encoder_hidden_size", &c->encoder_hidden_size, 0},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        PyObject *v = PyDict_GetItemString(d, ints[i].key); /* borrowed */
        if (!v) {
            if (ints[i].required) {
                PyErr_Format(PyExc_KeyError, "%s: missing key %s", what, ints[i].key);
                return -1;
            }
            continue;
        }
        long x = PyLong_AsLong(v);
        if (x == -1 && PyErr_Occurred()) return -1;
        if (x < INT32_MIN || x > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: %s is out of range", what, ints[i].key);
            return -1;
        }
        *ints[i].dst = (int)x;
    }
    PyObject *eps = PyDict_GetItemString(d, "rms_norm_eps"), *theta = PyDict_GetItemString(d, "rope_theta");
    if (!eps || !theta) {
        PyErr_Format(PyExc_KeyError, "%s: missing key %s", what, eps ? "rope_theta" : "rms_norm_eps");
        return -1;
    }
    c->rms_norm_eps = (float)PyFloat_AsDouble(eps);
    c->rope_theta = PyFloat_AsDouble(theta);
    if (PyErr_Occurred()) return -1;
    PyObject *rope = PyDict_GetItemString(d, "rope");
    if (rope && rope != Py_None && rope_config_from_dict(rope, &c->rope, keep) < 0) return -1;
    return 0;
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"decoder", "encoder", "n_threads", "backend", "bf16", NULL};
    PyObject *dec, *enc = Py_None, *backend = Py_None;
    int n_threads = 1, bf16 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OiOp:Model", names, &dec, &enc, &n_threads, &backend,
                                     &bf16))
        return -1;
    const cepe_backend *be = cepe_backend_from_capsule(backend);
    if (!be) return -1;
    cepe_config c = {0}, ec = {0};
    PyObject *keep[4] = {NULL, NULL, NULL, NULL}; /* longrope factor arrays, until create copies them */
    int rc = -1;
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model.__init__ called twice");
        return -1;
    }
    if (config_from_dict(dec, &c, "decoder config", keep) < 0) goto done;
    if (enc != Py_None && config_from_dict(enc, &ec, "encoder config", keep + 2) < 0) goto done;
    cepe_status st = cepe_model_create_on(&c, enc != Py_None ? &ec : NULL, n_threads, be, &self->model);
    if (!st && bf16) st = cepe_model_set_bf16(self->model);
    if (st) {
        raise_status(st);
        goto done;
    }
    rc = 0;
done:
    for (int i = 0; i < 4; i++) Py_XDECREF(keep[i]);
    if (rc < 0) return -1;
    self->n_threads = n_threads;
    if (backend != Py_None) {
        Py_INCREF(backend);
        self->backend = backend;
    }
    self->weights = PyList_New(0);
    return self->weights ? 0 : -1;
}

/* encode(ids int32 (n, L), mask uint8 (n, L) | None) -> float32 (n, L, d_enc) */
static PyObject *Model_encode(ModelObject *self, PyObject *args) {
    PyObject *ids_o, *mask_o = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:encode", &ids_o, &mask_o)) return NULL;
    PyArrayObject *ids = bind_array(ids_o, "encoder_input_ids", NPY_INT32, 2, 0), *mask = NULL;
    if (!ids) return NULL;
    if (mask_o != Py_None) {
        if (!(mask = bind_array(mask_o, "encoder_attention_mask", NPY_UINT8, 2, 0))) return NULL;
        if (!PyArray_SAMESHAPE(mask, ids))
            return PyErr_Format(PyExc_ValueError,
                                "encoder_attention_mask must have the shape of encoder_input_ids");
    }
    const npy_intp n = PyArray_DIM(ids, 0), L = PyArray_DIM(ids, 1);
    if (n < 1 || L < 1 || n > INT32_MAX || L > INT32_MAX)
        return PyErr_Format(PyExc_ValueError, "encoder_input_ids must hold at least one chunk of one token");
    const cepe_config *ec = cepe_model_encoder_config(self->model);
    if (!ec) return PyErr_Format(PyExc_ValueError, "this model has no CEPE encoder");
    npy_intp dims[3] = {n, L, ec->hidden_size};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    if (!out) return NULL;
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st = cepe_model_encode(self->model, (const int32_t *)PyArray_DATA(ids),
                                                  mask ? (const uint8_t *)PyArray_DATA(mask) : NULL, (int)n,
                                                  (int)L, (float *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS if (st) {
        Py_DECREF(out);
        return raise_status(st);
    }
    return (PyObject *)out;
}

/* bind(name, array, qtype=0, n_in=0): a float32 array (qtype 0), or the
 * stored rows of a matrix in GGML format qtype as uint8 (n_out, row bytes)
 * holding n_in values a row. */
static PyObject *Model_bind(ModelObject *self, PyObject *args) {
    const char *name;
    PyObject *obj;
    int qtype = 0;
    long long n_in = 0;
    if (!PyArg_ParseTuple(args, "sO|iL:bind", &name, &obj, &qtype, &n_in)) return NULL;
    char what[160];
    snprintf(what, sizeof what, "tensor %s", name);
    PyArrayObject *a = bind_array(obj, what, qtype ? NPY_UINT8 : NPY_FLOAT32, qtype ? 2 : -1, 0);
    if (!a) return NULL;
    int64_t shape[NPY_MAXDIMS];
    for (int i = 0; i < PyArray_NDIM(a); i++) shape[i] = (int64_t)PyArray_DIM(a, i);
    if (qtype) {
        const size_t rb = cepe_qtype_row_bytes(qtype, n_in);
        if (!cepe_qtype_name(qtype))
            return PyErr_Format(PyExc_ValueError, "tensor %s: unsupported weight type id %d", name, qtype);
        if (rb == 0 || (int64_t)rb != shape[1])
            return PyErr_Format(PyExc_ValueError,
                                "tensor %s: %lld bytes a row do not hold %lld values of %s (%zu bytes)", name,
                                (long long)shape[1], n_in, cepe_qtype_name(qtype), rb);
        shape[1] = n_in;
    }
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st =
        cepe_model_bind_q(self->model, name, PyArray_DATA(a), qtype, PyArray_NDIM(a), shape);
    Py_END_ALLOW_THREADS if (st) return raise_status(st);
    /* the CPU reads the array in place; a device backend made its own copy */
    if (!self->backend && PyList_Append(self->weights, obj) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Model_finalize(ModelObject *self, PyObject *Py_UNUSED(ignored)) {
    cepe_status st = cepe_model_finalize(self->model);
    if (st) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *Model_get_backend(ModelObject *self, void *Py_UNUSED(c)) {
    return PyUnicode_FromString(self->model ? cepe_model_backend_name(self->model) : "cpu");
}

static PyGetSetDef Model_getset[] = {
    {"backend", (getter)Model_get_backend, NULL, "name of the backend the model runs on", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Model_methods[] = {
    {"bind", (PyCFunction)Model_bind, METH_VARARGS,
     "bind(name, array, qtype=0, n_in=0): attach one weight by its HF name: float32, or a matrix's stored "
     "rows (uint8, GGML type qtype)"},
    {"finalize", (PyCFunction)Model_finalize, METH_NOARGS, "check that every weight is bound"},
    {"encode", (PyCFunction)Model_encode, METH_VARARGS,
     "encode(ids, mask): run the CEPE encoder over chunks"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject cepe_c_ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cepe_c.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A decoder in the C core; weights are borrowed from the bound arrays.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};

/* ----------------------------------------------------------------- Context */

typedef struct {
    PyObject_HEAD cepe_ctx *ctx;
    ModelObject *model;
    PyObject *states; /* the attached CEPE context array (kept alive), or NULL */
    int busy;         /* guarded by the GIL: set before releasing it */
} ContextObject;

static void Context_dealloc(ContextObject *self) {
    cepe_ctx_free(self->ctx);
    Py_XDECREF(self->states);
    Py_XDECREF(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Context_init(ContextObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"model", "batch", "capacity", "single_pass", NULL};
    PyObject *model, *batch_o, *capacity_o;
    int batch, capacity, single_pass = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OO|$p:Context", names, &cepe_c_ModelType, &model, &batch_o,
                                     &capacity_o, &single_pass))
        return -1;
    if (bind_int(batch_o, "batch", INT_MIN, INT_MAX, &batch) < 0 ||
        bind_int(capacity_o, "capacity", INT_MIN, INT_MAX, &capacity) < 0)
        return -1;
    if (self->ctx) {
        PyErr_SetString(PyExc_RuntimeError, "Context.__init__ called twice");
        return -1;
    }
    cepe_status st;
    cepe_model *mm = ((ModelObject *)model)->model;
    Py_BEGIN_ALLOW_THREADS st = single_pass ? cepe_ctx_create_single_pass(mm, batch, capacity, &self->ctx)
                                            : cepe_ctx_create(mm, batch, capacity, &self->ctx);
    Py_END_ALLOW_THREADS if (st) {
        raise_status(st);
        return -1;
    }
    Py_INCREF(model);
    self->model = (ModelObject *)model;
    return 0;
}

static int ready(ContextObject *self) {
    if (!self->ctx || !self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Context is not initialised");
        return -1;
    }
    return 0;
}

static int claim(ContextObject *self) {
    if (!self->ctx) {
        PyErr_SetString(PyExc_RuntimeError, "Context is not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this Context is in use by another thread; use one Context (or KVCache) per thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

/* The (ids, positions, mask) of a forward-style call, checked against the
 * context: ids int32 (B, T), positions float64 (B, T) | None, mask uint8
 * (B, T) | None. Borrowed arrays (they live in the caller's args). */
typedef struct {
    PyArrayObject *ids, *pos, *mask;
    npy_intp T;
} call_inputs;

static int parse_call_inputs(ContextObject *self, PyObject *ids_o, PyObject *pos_o, PyObject *mask_o,
                             call_inputs *in) {
    if (ready(self) < 0) return -1;
    in->pos = in->mask = NULL;
    if (!(in->ids = bind_array(ids_o, "input_ids", NPY_INT32, 2, 0))) return -1;
    const int B = cepe_ctx_batch(self->ctx);
    in->T = PyArray_DIM(in->ids, 1);
    if (PyArray_DIM(in->ids, 0) != B) {
        PyErr_Format(PyExc_ValueError, "input_ids has batch size %zd, the context was made for %d",
                     (Py_ssize_t)PyArray_DIM(in->ids, 0), B);
        return -1;
    }
    if (in->T < 1 || in->T > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "input_ids must hold at least one token per row");
        return -1;
    }
    if (pos_o != Py_None) {
        if (!(in->pos = bind_array(pos_o, "position_ids", NPY_FLOAT64, 2, 0))) return -1;
        if (!PyArray_SAMESHAPE(in->pos, in->ids)) {
            PyErr_Format(PyExc_ValueError, "position_ids must have the shape of input_ids");
            return -1;
        }
    }
    if (mask_o != Py_None) {
        if (!(in->mask = bind_array(mask_o, "attention_mask", NPY_UINT8, 2, 0))) return -1;
        if (!PyArray_SAMESHAPE(in->mask, in->ids)) {
            PyErr_Format(PyExc_ValueError, "attention_mask must have the shape of input_ids");
            return -1;
        }
    }
    return 0;
}

#define CALL_IDS(in) ((const int32_t *)PyArray_DATA((in).ids))
#define CALL_POS(in) ((in).pos ? (const double *)PyArray_DATA((in).pos) : NULL)
#define CALL_MASK(in) ((in).mask ? (const uint8_t *)PyArray_DATA((in).mask) : NULL)

/* forward(ids, positions, mask, logits_mode 0|1|2) -> None | (B, V) | (B, T, V) float32 */
static PyObject *Context_forward(ContextObject *self, PyObject *args) {
    PyObject *ids_o, *pos_o, *mask_o;
    int mode;
    call_inputs in;
    if (!PyArg_ParseTuple(args, "OOOi:forward", &ids_o, &pos_o, &mask_o, &mode)) return NULL;
    if (mode < 0 || mode > 2)
        return PyErr_Format(PyExc_ValueError, "logits_mode must be 0, 1 or 2, got %d", mode);
    if (parse_call_inputs(self, ids_o, pos_o, mask_o, &in) < 0) return NULL;
    const int B = cepe_ctx_batch(self->ctx);
    PyArrayObject *out = NULL;
    if (mode == CEPE_LOGITS_ALL) {
        npy_intp dims[3] = {B, in.T, cepe_model_config(self->model->model)->vocab_size};
        out = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    } else if (mode == CEPE_LOGITS_LAST) {
        npy_intp dims[2] = {B, cepe_model_config(self->model->model)->vocab_size};
        out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    }
    if (mode != CEPE_LOGITS_NONE && !out) return NULL;
    if (claim(self) < 0) {
        Py_XDECREF(out);
        return NULL;
    }
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st =
        cepe_ctx_forward(self->ctx, CALL_IDS(in), CALL_POS(in), CALL_MASK(in), (int)in.T,
                         out ? (float *)PyArray_DATA(out) : NULL, (cepe_logits_mode)mode);
    Py_END_ALLOW_THREADS self->busy = 0;
    if (st) {
        Py_XDECREF(out);
        return raise_status(st);
    }
    if (!out) Py_RETURN_NONE;
    return (PyObject *)out;
}

/* forward_nll(ids, positions, mask, targets int32 (B, T)) -> (B, T) float32
 * of -log p(target), 0 where the target is -100 */
static PyObject *Context_forward_nll(ContextObject *self, PyObject *args) {
    PyObject *ids_o, *pos_o, *mask_o, *tgt_o;
    call_inputs in;
    if (!PyArg_ParseTuple(args, "OOOO:forward_nll", &ids_o, &pos_o, &mask_o, &tgt_o)) return NULL;
    if (parse_call_inputs(self, ids_o, pos_o, mask_o, &in) < 0) return NULL;
    PyArrayObject *tgt = bind_array(tgt_o, "targets", NPY_INT32, 2, 0);
    if (!tgt) return NULL;
    if (!PyArray_SAMESHAPE(tgt, in.ids))
        return PyErr_Format(PyExc_ValueError, "targets must have the shape of input_ids");
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, PyArray_DIMS(in.ids), NPY_FLOAT32);
    if (!out) return NULL;
    if (claim(self) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st =
        cepe_ctx_forward_nll(self->ctx, CALL_IDS(in), CALL_POS(in), CALL_MASK(in), (int)in.T,
                             (const int32_t *)PyArray_DATA(tgt), (float *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS self->busy = 0;
    if (st) {
        Py_DECREF(out);
        return raise_status(st);
    }
    return (PyObject *)out;
}

/* The first n of max_new columns of a (B, max_new, ...) array, as a new array
 * (so the unused tail is not kept alive). */
static PyObject *first_columns(PyArrayObject *a, int n) {
    npy_intp dims[3];
    const int nd = PyArray_NDIM(a);
    for (int i = 0; i < nd; i++) dims[i] = PyArray_DIM(a, i);
    const npy_intp max_new = dims[1];
    dims[1] = n;
    PyArrayObject *res = (PyArrayObject *)PyArray_SimpleNew(nd, dims, PyArray_TYPE(a));
    if (!res) return NULL;
    const size_t row_in = (size_t)PyArray_STRIDE(a, 0),
                 row_out = row_in / (size_t)(max_new ? max_new : 1) * (size_t)n;
    for (npy_intp b = 0; b < dims[0]; b++)
        memcpy((char *)PyArray_DATA(res) + (size_t)b * row_out, (char *)PyArray_DATA(a) + (size_t)b * row_in,
               row_out);
    return (PyObject *)res;
}

/* generate(sampler, max_new_tokens, top_logprobs=-1) -> ids int32 (B, n), or
 * with top_logprobs >= 0 (ids, logprobs float32 (B, n), top_ids int32
 * (B, n, k), top_logprobs float32 (B, n, k)); n < max_new_tokens once every
 * row finished. */
static PyObject *Context_generate(ContextObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"sampler", "max_new_tokens", "top_logprobs", NULL};
    PyObject *sampler_o, *max_new_o, *k_o = NULL;
    int max_new, k = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:generate", names, &sampler_o, &max_new_o, &k_o))
        return NULL;
    if (bind_int(max_new_o, "max_new_tokens", INT_MIN, INT_MAX, &max_new) < 0 ||
        (k_o && bind_int(k_o, "top_logprobs", -1, INT_MAX, &k) < 0))
        return NULL;
    if (!PyObject_TypeCheck(sampler_o, &cepe_c_SamplerType))
        return PyErr_Format(PyExc_TypeError, "sampler must be a cepe_c.Sampler, got %s",
                            Py_TYPE(sampler_o)->tp_name);
    if (ready(self) < 0) return NULL;
    if (max_new < 0) return PyErr_Format(PyExc_ValueError, "max_new_tokens must be >= 0, got %d", max_new);
    if (max_new > cepe_ctx_capacity(self->ctx) - cepe_ctx_length(self->ctx) + 1) /* before allocating out */
        return PyErr_Format(PyExc_RuntimeError,
                            "context capacity exceeded: %d cached + %d new tokens > capacity %d",
                            cepe_ctx_length(self->ctx), max_new - 1, cepe_ctx_capacity(self->ctx));
    if (k > ((SamplerObject *)sampler_o)->vocab_size)
        return PyErr_Format(PyExc_ValueError, "top_logprobs must be <= %d, got %d",
                            ((SamplerObject *)sampler_o)->vocab_size, k);
    const int B = cepe_ctx_batch(self->ctx);
    npy_intp dims[3] = {B, max_new, k > 0 ? k : 0};
    PyArrayObject *arr[4] = {(PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_INT32), NULL, NULL, NULL};
    if (k >= 0) {
        arr[1] = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        arr[2] = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_INT32);
        arr[3] = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    }
    PyObject *res = NULL;
    cepe_sampler *s = NULL;
    if (!arr[0] || (k >= 0 && (!arr[1] || !arr[2] || !arr[3]))) goto done;
    if (claim(self) < 0) goto done;
    if (!(s = bind_sampler(sampler_o))) {
        self->busy = 0;
        goto done;
    }
    cepe_logprobs lp = {0};
    if (k >= 0)
        lp = (cepe_logprobs){(float *)PyArray_DATA(arr[1]), k, (int32_t *)PyArray_DATA(arr[2]),
                             (float *)PyArray_DATA(arr[3])};
    int n = 0;
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st =
        cepe_ctx_generate(self->ctx, s, max_new, (int32_t *)PyArray_DATA(arr[0]), &n, k >= 0 ? &lp : NULL);
    Py_END_ALLOW_THREADS self->busy = 0;
    bind_sampler_release(sampler_o);
    if (st) {
        raise_status(st);
        goto done;
    }
    const int n_out = k >= 0 ? 4 : 1;
    if (!(res = PyTuple_New(n_out))) goto done;
    for (int i = 0; i < n_out; i++) {
        PyObject *item = n == max_new ? (Py_INCREF(arr[i]), (PyObject *)arr[i]) : first_columns(arr[i], n);
        if (!item) {
            Py_CLEAR(res);
            goto done;
        }
        PyTuple_SET_ITEM(res, i, item);
    }
    if (k < 0) { /* just the ids */
        PyObject *ids = PyTuple_GET_ITEM(res, 0);
        Py_INCREF(ids);
        Py_DECREF(res);
        res = ids;
    }
done:
    for (int i = 0; i < 4; i++) Py_XDECREF(arr[i]);
    return res;
}

/* set_context(states float32 (B, N, d_enc) | None, mask uint8 (B, N) | None, keep_kv bool) */
static PyObject *Context_set_context(ContextObject *self, PyObject *args) {
    PyObject *st_o, *mask_o;
    int keep = 1;
    if (!PyArg_ParseTuple(args, "OO|p:set_context", &st_o, &mask_o, &keep)) return NULL;
    if (ready(self) < 0) return NULL;
    PyArrayObject *states = NULL, *mask = NULL;
    int N = 0;
    if (st_o != Py_None) {
        if (!(states = bind_array(st_o, "encoder_hidden_states", NPY_FLOAT32, 3, 0))) return NULL;
        const cepe_config *c = cepe_model_config(self->model->model);
        if (PyArray_DIM(states, 0) != cepe_ctx_batch(self->ctx) ||
            PyArray_DIM(states, 2) != c->encoder_hidden_size)
            return PyErr_Format(
                PyExc_ValueError, "encoder_hidden_states has shape (%zd, %zd, %zd), expected (%d, N, %d)",
                (Py_ssize_t)PyArray_DIM(states, 0), (Py_ssize_t)PyArray_DIM(states, 1),
                (Py_ssize_t)PyArray_DIM(states, 2), cepe_ctx_batch(self->ctx), c->encoder_hidden_size);
        if (PyArray_DIM(states, 1) > INT32_MAX) return PyErr_Format(PyExc_ValueError, "context too long");
        N = (int)PyArray_DIM(states, 1);
        if (mask_o != Py_None) {
            if (!(mask = bind_array(mask_o, "encoder_attention_mask", NPY_UINT8, 2, 0))) return NULL;
            if (PyArray_DIM(mask, 0) != PyArray_DIM(states, 0) || PyArray_DIM(mask, 1) != N)
                return PyErr_Format(PyExc_ValueError, "encoder_attention_mask must have shape (%d, %d)",
                                    cepe_ctx_batch(self->ctx), N);
        }
    }
    if (claim(self) < 0) return NULL;
    cepe_status s;
    Py_BEGIN_ALLOW_THREADS s =
        cepe_ctx_set_context(self->ctx, states ? (const float *)PyArray_DATA(states) : NULL,
                             mask ? (const uint8_t *)PyArray_DATA(mask) : NULL, N, keep);
    Py_END_ALLOW_THREADS self->busy = 0;
    Py_CLEAR(self->states);
    if (s) return raise_status(s);
    if (N > 0 && !keep) { /* recomputing K/V reads the states at every call */
        Py_INCREF(st_o);
        self->states = st_o;
    }
    Py_RETURN_NONE;
}

/* encode_context(ids int32 (B, n_chunks, L), mask uint8 (B, n_chunks, L) | None, keep_kv bool):
 * the CEPE encoder's states made and attached inside the core, never returned */
static PyObject *Context_encode_context(ContextObject *self, PyObject *args) {
    PyObject *ids_o, *mask_o;
    int keep = 1;
    if (!PyArg_ParseTuple(args, "OO|p:encode_context", &ids_o, &mask_o, &keep)) return NULL;
    if (ready(self) < 0) return NULL;
    PyArrayObject *ids = bind_array(ids_o, "encoder_input_ids", NPY_INT32, 3, 0), *mask = NULL;
    if (!ids) return NULL;
    if (PyArray_DIM(ids, 0) != cepe_ctx_batch(self->ctx))
        return PyErr_Format(PyExc_ValueError, "encoder_input_ids has batch size %zd, the request has %d",
                            (Py_ssize_t)PyArray_DIM(ids, 0), cepe_ctx_batch(self->ctx));
    if (PyArray_DIM(ids, 1) < 1 || PyArray_DIM(ids, 2) < 1 || PyArray_DIM(ids, 1) > INT32_MAX ||
        PyArray_DIM(ids, 2) > INT32_MAX)
        return PyErr_Format(PyExc_ValueError, "encoder_input_ids must hold at least one chunk of one token");
    if (mask_o != Py_None) {
        if (!(mask = bind_array(mask_o, "encoder_attention_mask", NPY_UINT8, 3, 0))) return NULL;
        if (!PyArray_SAMESHAPE(mask, ids))
            return PyErr_Format(PyExc_ValueError,
                                "encoder_attention_mask must have the shape of encoder_input_ids");
    }
    if (claim(self) < 0) return NULL;
    cepe_status s;
    Py_BEGIN_ALLOW_THREADS s = cepe_ctx_encode_context(
        self->ctx, (const int32_t *)PyArray_DATA(ids), mask ? (const uint8_t *)PyArray_DATA(mask) : NULL,
        (int)PyArray_DIM(ids, 1), (int)PyArray_DIM(ids, 2), keep);
    Py_END_ALLOW_THREADS self->busy = 0;
    Py_CLEAR(self->states); /* the states, kept or not, are the core's own */
    if (s) return raise_status(s);
    Py_RETURN_NONE;
}

/* save_state() -> (len, k, v, valid, next_pos, inv_freq, last_logits, rope_mscale, rope_cached_len,
 * rope_len_hint, has_logits): the cache by value (cepe_ctx_save), NumPy arrays it owns. */
static PyObject *Context_save_state(ContextObject *self, PyObject *Py_UNUSED(ignored)) {
    if (claim(self) < 0) return NULL;
    int L = 0, kvd = 0, half = 0;
    cepe_ctx_state_sizes(self->ctx, &L, &kvd, &half);
    const cepe_config *c = cepe_model_config(self->model->model);
    const int B = cepe_ctx_batch(self->ctx), T = cepe_ctx_length(self->ctx);
    PyObject *out = NULL;
    const npy_intp kv_dims[4] = {L, B, T, kvd}, valid_dims[2] = {B, T}, pos_dims[1] = {B},
                   freq_dims[1] = {half}, logit_dims[2] = {B, c->vocab_size};
    PyArrayObject *k = (PyArrayObject *)PyArray_SimpleNew(4, kv_dims, NPY_FLOAT32);
    PyArrayObject *v = (PyArrayObject *)PyArray_SimpleNew(4, kv_dims, NPY_FLOAT32);
    PyArrayObject *valid = (PyArrayObject *)PyArray_SimpleNew(2, valid_dims, NPY_UINT8);
    PyArrayObject *pos = (PyArrayObject *)PyArray_SimpleNew(1, pos_dims, NPY_FLOAT64);
    PyArrayObject *freq = (PyArrayObject *)PyArray_SimpleNew(1, freq_dims, NPY_FLOAT32);
    PyArrayObject *logits = (PyArrayObject *)PyArray_SimpleNew(2, logit_dims, NPY_FLOAT32);
    if (!k || !v || !valid || !pos || !freq || !logits) goto fail;
    cepe_ctx_state st = {.len = T,
                         .k = PyArray_DATA(k),
                         .v = PyArray_DATA(v),
                         .valid = PyArray_DATA(valid),
                         .next_pos = PyArray_DATA(pos),
                         .inv_freq = PyArray_DATA(freq),
                         .last_logits = PyArray_DATA(logits)};
    cepe_status s;
    Py_BEGIN_ALLOW_THREADS s = cepe_ctx_save(self->ctx, &st);
    Py_END_ALLOW_THREADS self->busy = 0;
    if (s) {
        raise_status(s);
        goto fail;
    }
    out = Py_BuildValue("(iOOOOOOdiii)", T, k, v, valid, pos, freq, logits, (double)st.rope_mscale,
                        st.rope_cached_len, st.rope_len_hint, st.has_logits);
fail:
    self->busy = 0;
    Py_XDECREF(k), Py_XDECREF(v), Py_XDECREF(valid), Py_XDECREF(pos), Py_XDECREF(freq), Py_XDECREF(logits);
    return out;
}

/* load_state(len, k, v, valid, next_pos, inv_freq, last_logits, rope_mscale, rope_cached_len,
 * rope_len_hint, has_logits): replaces the cache with what save_state gave (cepe_ctx_load). */
static PyObject *Context_load_state(ContextObject *self, PyObject *args) {
    int T, cached, hint, has_logits;
    double mscale;
    PyObject *k_o, *v_o, *valid_o, *pos_o, *freq_o, *logits_o;
    if (!PyArg_ParseTuple(args, "iOOOOOOdiii:load_state", &T, &k_o, &v_o, &valid_o, &pos_o, &freq_o,
                          &logits_o, &mscale, &cached, &hint, &has_logits))
        return NULL;
    if (ready(self) < 0) return NULL;
    if (T < 0 || T > cepe_ctx_capacity(self->ctx))
        return PyErr_Format(PyExc_ValueError, "a cache of %d tokens does not fit the capacity %d", T,
                            cepe_ctx_capacity(self->ctx));
    int L = 0, kvd = 0, half = 0;
    cepe_ctx_state_sizes(self->ctx, &L, &kvd, &half);
    const cepe_config *c = cepe_model_config(self->model->model);
    const int B = cepe_ctx_batch(self->ctx);
    const npy_intp kv_dims[4] = {L, B, T, kvd}, valid_dims[2] = {B, T}, pos_dims[1] = {B},
                   freq_dims[1] = {half}, logit_dims[2] = {B, c->vocab_size};
    PyArrayObject *k, *v, *valid, *pos, *freq, *logits;
    if (!(k = bind_array(k_o, "k", NPY_FLOAT32, 4, 0)) || bind_dims(k, "k", 4, kv_dims) < 0) return NULL;
    if (!(v = bind_array(v_o, "v", NPY_FLOAT32, 4, 0)) || bind_dims(v, "v", 4, kv_dims) < 0) return NULL;
    if (!(valid = bind_array(valid_o, "valid", NPY_UINT8, 2, 0)) ||
        bind_dims(valid, "valid", 2, valid_dims) < 0)
        return NULL;
    if (!(pos = bind_array(pos_o, "next_pos", NPY_FLOAT64, 1, 0)) ||
        bind_dims(pos, "next_pos", 1, pos_dims) < 0)
        return NULL;
    if (!(freq = bind_array(freq_o, "inv_freq", NPY_FLOAT32, 1, 0)) ||
        bind_dims(freq, "inv_freq", 1, freq_dims) < 0)
        return NULL;
    if (!(logits = bind_array(logits_o, "last_logits", NPY_FLOAT32, 2, 0)) ||
        bind_dims(logits, "last_logits", 2, logit_dims) < 0)
        return NULL;
    cepe_ctx_state st = {.len = T,
                         .k = PyArray_DATA(k),
                         .v = PyArray_DATA(v),
                         .valid = PyArray_DATA(valid),
                         .next_pos = PyArray_DATA(pos),
                         .inv_freq = PyArray_DATA(freq),
                         .last_logits = PyArray_DATA(logits),
                         .rope_mscale = (float)mscale,
                         .rope_cached_len = cached,
                         .rope_len_hint = hint,
                         .has_logits = has_logits};
    if (claim(self) < 0) return NULL;
    cepe_status s;
    Py_BEGIN_ALLOW_THREADS s = cepe_ctx_load(self->ctx, &st);
    Py_END_ALLOW_THREADS self->busy = 0;
    if (s) return raise_status(s);
    Py_RETURN_NONE;
}

static PyObject *Context_set_rope_length(ContextObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (ready(self) < 0) return NULL;
    cepe_ctx_set_rope_length(self->ctx, n < 0 ? 0 : (n > INT32_MAX ? INT32_MAX : (int)n));
    Py_RETURN_NONE;
}

static PyObject *Context_reset(ContextObject *self, PyObject *Py_UNUSED(ignored)) {
    if (claim(self) < 0) return NULL;
    cepe_ctx_reset(self->ctx);
    self->busy = 0;
    Py_RETURN_NONE;
}

/* progress() -> (done, total) layer passes of the running (or last) forward
 * call; safe while another thread is inside a call. */
static PyObject *Context_progress(ContextObject *self, PyObject *Py_UNUSED(ignored)) {
    long done = 0, total = 0;
    if (self->ctx) cepe_ctx_progress(self->ctx, &done, &total);
    return Py_BuildValue("(ll)", done, total);
}

static PyObject *Context_interrupt(ContextObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->ctx) cepe_ctx_interrupt(self->ctx);
    Py_RETURN_NONE;
}

static PyObject *Context_get_length(ContextObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromLong(cepe_ctx_length(self->ctx));
}
static PyObject *Context_get_capacity(ContextObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromLong(cepe_ctx_capacity(self->ctx));
}
static PyObject *Context_get_batch(ContextObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromLong(cepe_ctx_batch(self->ctx));
}

static PyObject *Context_get_context_length(ContextObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromLong(cepe_ctx_context_length(self->ctx));
}

static PyGetSetDef Context_getset[] = {
    {"context_length", (getter)Context_get_context_length, NULL, "attached CEPE context tokens per row",
     NULL},
    {"length", (getter)Context_get_length, NULL, "tokens per row already in the cache", NULL},
    {"capacity", (getter)Context_get_capacity, NULL, "maximum tokens per row", NULL},
    {"batch", (getter)Context_get_batch, NULL, "rows", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Context_methods[] = {
    {"forward", (PyCFunction)Context_forward, METH_VARARGS,
     "forward(ids, positions, mask, logits_mode): append tokens and run the decoder"},
    {"forward_nll", (PyCFunction)Context_forward_nll, METH_VARARGS,
     "forward_nll(ids, positions, mask, targets): as forward, returning -log p(targets) (B, T); -100 is not "
     "scored"},
    {"generate", (PyCFunction)(void (*)(void))Context_generate, METH_VARARGS | METH_KEYWORDS,
     "generate(sampler, max_new_tokens, top_logprobs=-1): sample up to max_new_tokens per row with a "
     "Sampler"},
    {"reset", (PyCFunction)Context_reset, METH_NOARGS, "empty the KV cache"},
    {"save_state", (PyCFunction)Context_save_state, METH_NOARGS,
     "the KV cache by value: (len, k, v, valid, next_pos, inv_freq, last_logits, rope_mscale, "
     "rope_cached_len, "
     "rope_len_hint, has_logits)"},
    {"load_state", (PyCFunction)Context_load_state, METH_VARARGS,
     "load_state(*save_state()): replace the cache"},
    {"set_rope_length", (PyCFunction)Context_set_rope_length, METH_O,
     "pin the length dynamic-NTK/LongRoPE tables are computed for (0 = per call)"},
    {"set_context", (PyCFunction)Context_set_context, METH_VARARGS,
     "set_context(states, mask, keep_kv=True): attach CEPE encoder states (None detaches)"},
    {"encode_context", (PyCFunction)Context_encode_context, METH_VARARGS,
     "encode_context(ids, mask, keep_kv=True): encode CEPE context chunks (B, n_chunks, L) and attach them"},
    {"interrupt", (PyCFunction)Context_interrupt, METH_NOARGS, "ask a running call to stop"},
    {"progress", (PyCFunction)Context_progress, METH_NOARGS,
     "(done, total) layer passes of the running or last forward call"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ContextType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cepe_c.Context",
    .tp_basicsize = sizeof(ContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Context(model, batch, capacity, *, single_pass=False): per-request state of a Model: KV cache "
              "and scratch. single_pass: a cache of one layer, for one forward call that is not continued.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Context_init,
    .tp_dealloc = (destructor)Context_dealloc,
    .tp_methods = Context_methods,
    .tp_getset = Context_getset,
};

/* ------------------------------------------------------------------ module */

static PyObject *mod_blas_info(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    return PyUnicode_FromString(cepe_blas_info());
}
static PyObject *mod_max_threads(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    return PyLong_FromLong(cepe_max_threads());
}
static PyObject *mod_set_blas_threads(PyObject *Py_UNUSED(m), PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if ((n == -1 && PyErr_Occurred()) || bind_threads(n) < 0) return NULL;
    cepe_set_blas_threads((int)n);
    Py_RETURN_NONE;
}

/* A device-simulating CPU backend (csrc/backend.h), for tests of the
 * host/device boundary on machines without a GPU. */
static PyObject *mod_sim_backend(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a)) {
    cepe_backend *be = cepe_backend_cpu_device_sim();
    if (!be) return PyErr_NoMemory();
    return cepe_backend_capsule_new(be);
}

static PyMethodDef module_methods[] = {
    {"_sim_backend", mod_sim_backend, METH_NOARGS, "test-only: a CPU backend that behaves like a device"},
    {"blas_info", mod_blas_info, METH_NOARGS, "the linked BLAS and its build configuration"},
    {"max_threads", mod_max_threads, METH_NOARGS, "OpenMP's thread limit"},
    {"set_blas_threads", mod_set_blas_threads, METH_O, "set the (process-wide) BLAS thread count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "cepe_c",
    "C core of cepe (see csrc/cepe.h).",
    -1,
    module_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit_cepe_c(void) {
    import_array();
    if (PyType_Ready(&cepe_c_ModelType) < 0 || PyType_Ready(&ContextType) < 0 ||
        PyType_Ready(&cepe_c_SamplerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    const int failed = PyModule_AddFunctions(m, cepe_rope_methods) < 0 ||
                       PyModule_AddFunctions(m, cepe_train_methods) < 0 ||
                       PyModule_AddFunctions(m, cepe_ops_methods) < 0 || cepe_ops_add_constants(m) < 0 ||
                       PyModule_AddObjectRef(m, "Model", (PyObject *)&cepe_c_ModelType) < 0 ||
                       PyModule_AddObjectRef(m, "Context", (PyObject *)&ContextType) < 0 ||
                       PyModule_AddObjectRef(m, "Sampler", (PyObject *)&cepe_c_SamplerType) < 0;
    if (failed) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
