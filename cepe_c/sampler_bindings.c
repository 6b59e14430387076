/* sampler_bindings.c — cepe_c.Sampler: a cepe_sampler (the sampler chain of
 * csrc/cepe.h) that Context.generate draws with, or that samples logits
 * the caller holds. */
#include "bind.h"

#include <structmember.h>

static void Sampler_dealloc(SamplerObject *self) {
    cepe_sampler_free(self->sampler);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* An optional 1-D array argument into (*data, *n); 0, or -1 with an exception. */
static int optional_1d(PyObject *obj, const char *what, int type, const void **data, npy_intp *n) {
    PyArrayObject *a;
    if (bind_optional_array(obj, what, type, 1, &a) < 0) return -1;
    *data = a ? PyArray_DATA(a) : NULL;
    *n = a ? PyArray_DIM(a, 0) : 0;
    return 0;
}

/* Sampler(batch, vocab_size, *, temperature, top_k, top_p, min_p, typical_p,
 *         repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty,
 *         bias_ids int32, bias float32, seed, eos_ids int32, pad_token_id,
 *         token_text uint8, token_offsets int32, stop_text uint8, stop_offsets int32)
 * Unset settings are off; cepe/sampling.py passes them all. */
static int Sampler_init(SamplerObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"batch",
                            "vocab_size",
                            "temperature",
                            "top_k",
                            "top_p",
                            "min_p",
                            "typical_p",
                            "repeat_penalty",
                            "repeat_last_n",
                            "frequency_penalty",
                            "presence_penalty",
                            "bias_ids",
                            "bias",
                            "seed",
                            "eos_ids",
                            "pad_token_id",
                            "token_text",
                            "token_offsets",
                            "stop_text",
                            "stop_offsets",
                            NULL};
    PyObject *batch_o, *vocab_o, *top_k_o = NULL, *last_n_o = NULL, *pad_o = NULL;
    PyObject *bias_ids_o = NULL, *bias_o = NULL, *eos_o = NULL, *ttext_o = NULL, *toff_o = NULL,
             *stext_o = NULL, *soff_o = NULL;
    double temperature = 0.0, top_p = 1.0, min_p = 0.0, typical_p = 1.0, repeat_penalty = 1.0, freq = 0.0,
           pres = 0.0;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$dOddddOddOOKOOOOOO:Sampler", names, &batch_o, &vocab_o,
                                     &temperature, &top_k_o, &top_p, &min_p, &typical_p, &repeat_penalty,
                                     &last_n_o, &freq, &pres, &bias_ids_o, &bias_o, &seed, &eos_o, &pad_o,
                                     &ttext_o, &toff_o, &stext_o, &soff_o))
        return -1;
    if (self->sampler) {
        PyErr_SetString(PyExc_RuntimeError, "Sampler.__init__ called twice");
        return -1;
    }
    int batch, V;
    cepe_sampling s = {.temperature = (float)temperature,
                       .top_p = (float)top_p,
                       .min_p = (float)min_p,
                       .typical_p = (float)typical_p,
                       .repeat_penalty = (float)repeat_penalty,
                       .frequency_penalty = (float)freq,
                       .presence_penalty = (float)pres,
                       .seed = seed};
    if (bind_int(batch_o, "batch", INT_MIN, INT_MAX, &batch) < 0 ||
        bind_int(vocab_o, "vocab_size", INT_MIN, INT_MAX, &V) < 0 ||
        (top_k_o && bind_int(top_k_o, "top_k", INT_MIN, INT_MAX, &s.top_k) < 0) ||
        (last_n_o && bind_int(last_n_o, "repeat_last_n", INT_MIN, INT_MAX, &s.repeat_last_n) < 0) ||
        (pad_o && bind_int(pad_o, "pad_token_id", INT_MIN, INT_MAX, &s.pad_token_id) < 0))
        return -1;
    npy_intp n_bias, n_bias2, n_eos, n_ttext, n_toff, n_stext, n_soff;
    if (optional_1d(bias_ids_o, "bias_ids", NPY_INT32, (const void **)&s.bias_ids, &n_bias) < 0 ||
        optional_1d(bias_o, "bias", NPY_FLOAT32, (const void **)&s.bias, &n_bias2) < 0 ||
        optional_1d(eos_o, "eos_ids", NPY_INT32, (const void **)&s.eos_ids, &n_eos) < 0 ||
        optional_1d(ttext_o, "token_text", NPY_UINT8, (const void **)&s.token_text, &n_ttext) < 0 ||
        optional_1d(toff_o, "token_offsets", NPY_INT32, (const void **)&s.token_offsets, &n_toff) < 0 ||
        optional_1d(stext_o, "stop_text", NPY_UINT8, (const void **)&s.stop_text, &n_stext) < 0 ||
        optional_1d(soff_o, "stop_offsets", NPY_INT32, (const void **)&s.stop_offsets, &n_soff) < 0)
        return -1;
    if (n_bias != n_bias2) {
        PyErr_Format(PyExc_ValueError, "bias_ids and bias differ in length (%zd, %zd)", (Py_ssize_t)n_bias,
                     (Py_ssize_t)n_bias2);
        return -1;
    }
    if (n_bias > INT32_MAX || n_eos > INT32_MAX || n_soff > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many logit biases, eos ids or stop strings");
        return -1;
    }
    s.n_bias = (int)n_bias, s.n_eos = (int)n_eos;
    if (s.stop_offsets) { /* the offsets must end at their text's end: the core reads up to them */
        const int32_t *so = s.stop_offsets, *to = s.token_offsets;
        if (n_soff < 1 || so[n_soff - 1] != n_stext) {
            PyErr_SetString(PyExc_ValueError,
                            "stop_offsets must be (n_stop + 1) offsets ending at len(stop_text)");
            return -1;
        }
        if (!to || n_toff != (npy_intp)V + 1 || to[V] != n_ttext) {
            PyErr_SetString(
                PyExc_ValueError,
                "stop strings need token_offsets: vocab_size + 1 offsets ending at len(token_text)");
            return -1;
        }
        s.n_stop = (int)(n_soff - 1);
    }
    cepe_status st = cepe_sampler_create(&s, batch, V, &self->sampler);
    if (st) {
        raise_status(st);
        return -1;
    }
    self->batch = batch, self->vocab_size = V;
    return 0;
}

cepe_sampler *bind_sampler(PyObject *obj) {
    if (!PyObject_TypeCheck(obj, &cepe_c_SamplerType)) {
        PyErr_Format(PyExc_TypeError, "sampler must be a cepe_c.Sampler, got %s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    SamplerObject *so = (SamplerObject *)obj;
    if (!so->sampler) {
        PyErr_SetString(PyExc_RuntimeError, "Sampler is not initialised");
        return NULL;
    }
    if (so->busy) {
        PyErr_SetString(PyExc_RuntimeError, "this Sampler is in use by another thread; use one per request");
        return NULL;
    }
    so->busy = 1;
    return so->sampler;
}

void bind_sampler_release(PyObject *obj) { ((SamplerObject *)obj)->busy = 0; }

/* The logits argument: float32 (vocab_size,). */
static PyArrayObject *row_logits(SamplerObject *self, PyObject *obj, int V) {
    PyArrayObject *a = bind_array(obj, "logits", NPY_FLOAT32, 1, 0);
    if (a && PyArray_DIM(a, 0) != V) {
        PyErr_Format(PyExc_ValueError, "logits must have %d entries (the vocabulary), got %zd", V,
                     (Py_ssize_t)PyArray_DIM(a, 0));
        return NULL;
    }
    (void)self;
    return a;
}

/* accept(ids int32 (batch, T), mask uint8 (batch, T) | None) */
static PyObject *Sampler_accept(SamplerObject *self, PyObject *args) {
    PyObject *ids_o, *mask_o = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:accept", &ids_o, &mask_o)) return NULL;
    PyArrayObject *ids = bind_array(ids_o, "ids", NPY_INT32, 2, 0), *mask = NULL;
    if (!ids || bind_optional_array(mask_o, "mask", NPY_UINT8, 2, &mask) < 0) return NULL;
    if (mask && !PyArray_SAMESHAPE(ids, mask))
        return PyErr_Format(PyExc_ValueError, "mask must have the shape of ids");
    if (PyArray_DIM(ids, 1) > INT32_MAX) return PyErr_Format(PyExc_ValueError, "too many tokens");
    cepe_sampler *s = bind_sampler((PyObject *)self);
    if (!s) return NULL;
    if (PyArray_DIM(ids, 0) != self->batch) {
        bind_sampler_release((PyObject *)self);
        return PyErr_Format(PyExc_ValueError, "ids must have %d rows, got %zd", self->batch,
                            (Py_ssize_t)PyArray_DIM(ids, 0));
    }
    cepe_status st =
        cepe_sampler_accept(s, (const int32_t *)PyArray_DATA(ids),
                            mask ? (const uint8_t *)PyArray_DATA(mask) : NULL, (int)PyArray_DIM(ids, 1));
    bind_sampler_release((PyObject *)self);
    if (st) return raise_status(st);
    Py_RETURN_NONE;
}

/* distribution(row, logits float32 (V,)) -> float32 (V,) */
static PyObject *Sampler_distribution(SamplerObject *self, PyObject *args) {
    PyObject *row_o, *lg_o;
    int row;
    if (!PyArg_ParseTuple(args, "OO:distribution", &row_o, &lg_o)) return NULL;
    if (bind_int(row_o, "row", INT_MIN, INT_MAX, &row) < 0) return NULL;
    PyArrayObject *lg = row_logits(self, lg_o, self->vocab_size);
    if (!lg) return NULL;
    npy_intp dims[1] = {self->vocab_size};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!out) return NULL;
    cepe_sampler *s = bind_sampler((PyObject *)self);
    if (!s) {
        Py_DECREF(out);
        return NULL;
    }
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st =
        cepe_sampler_distribution(s, row, (const float *)PyArray_DATA(lg), (float *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS bind_sampler_release((PyObject *)self);
    if (st) {
        Py_DECREF(out);
        return raise_status(st);
    }
    return (PyObject *)out;
}

/* sample(row, logits float32 (V,), top_logprobs=-1) -> token, or with
 * top_logprobs >= 0 (token, logprob, top_ids int32 (k,), top_logprobs float32 (k,)) */
static PyObject *Sampler_sample(SamplerObject *self, PyObject *args) {
    PyObject *row_o, *lg_o, *k_o = NULL;
    int row, k = -1;
    if (!PyArg_ParseTuple(args, "OO|O:sample", &row_o, &lg_o, &k_o)) return NULL;
    if (bind_int(row_o, "row", INT_MIN, INT_MAX, &row) < 0 ||
        (k_o && bind_int(k_o, "top_logprobs", -1, self->vocab_size, &k) < 0))
        return NULL;
    PyArrayObject *lg = row_logits(self, lg_o, self->vocab_size);
    if (!lg) return NULL;
    npy_intp dims[1] = {k > 0 ? k : 0};
    PyArrayObject *ids = NULL, *lps = NULL;
    float logprob = 0.0f;
    cepe_logprobs lp = {&logprob, k > 0 ? k : 0, NULL, NULL};
    if (k >= 0) {
        ids = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT32);
        lps = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT32);
        if (!ids || !lps) goto fail;
        lp.top_ids = (int32_t *)PyArray_DATA(ids), lp.top_logprobs = (float *)PyArray_DATA(lps);
    }
    cepe_sampler *s = bind_sampler((PyObject *)self);
    if (!s) goto fail;
    int32_t tok = 0;
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st =
        cepe_sampler_sample(s, row, (const float *)PyArray_DATA(lg), &tok, k >= 0 ? &lp : NULL);
    Py_END_ALLOW_THREADS bind_sampler_release((PyObject *)self);
    if (st) {
        raise_status(st);
        goto fail;
    }
    if (k < 0) return PyLong_FromLong(tok);
    return Py_BuildValue("(ldNN)", (long)tok, (double)logprob, ids, lps);
fail:
    Py_XDECREF(ids);
    Py_XDECREF(lps);
    return NULL;
}

/* finished(row) -> 0 running, 1 eos, 2 stop string */
static PyObject *Sampler_finished(SamplerObject *self, PyObject *row_o) {
    int row;
    if (bind_int(row_o, "row", 0, self->batch - 1, &row) < 0) return NULL;
    return PyLong_FromLong(cepe_sampler_finished(self->sampler, row));
}

/* generated(row) -> tokens the row has sampled */
static PyObject *Sampler_generated(SamplerObject *self, PyObject *row_o) {
    int row;
    if (bind_int(row_o, "row", 0, self->batch - 1, &row) < 0) return NULL;
    return PyLong_FromLong(cepe_sampler_generated(self->sampler, row));
}

static PyMethodDef Sampler_methods[] = {
    {"accept", (PyCFunction)Sampler_accept, METH_VARARGS,
     "accept(ids, mask=None): add (batch, T) tokens to each row's penalty window"},
    {"distribution", (PyCFunction)Sampler_distribution, METH_VARARGS,
     "distribution(row, logits): the probabilities the row's next token is drawn from"},
    {"sample", (PyCFunction)Sampler_sample, METH_VARARGS,
     "sample(row, logits, top_logprobs=-1): pick and accept the row's next token"},
    {"finished", (PyCFunction)Sampler_finished, METH_O, "finished(row): 0 running, 1 eos, 2 stop string"},
    {"generated", (PyCFunction)Sampler_generated, METH_O, "generated(row): tokens the row has sampled"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Sampler_members[] = {
    {"batch", T_INT, offsetof(SamplerObject, batch), READONLY, "rows"},
    {"vocab_size", T_INT, offsetof(SamplerObject, vocab_size), READONLY, "logits per row"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject cepe_c_SamplerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cepe_c.Sampler",
    .tp_basicsize = sizeof(SamplerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The sampler chain of the C core, with its random stream and each row's token window.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Sampler_init,
    .tp_dealloc = (destructor)Sampler_dealloc,
    .tp_methods = Sampler_methods,
    .tp_members = Sampler_members,
};
