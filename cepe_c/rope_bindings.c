/* rope_bindings.c — CPython face of the RoPE frequency code and the E2-LLM
 * sampler (csrc/rope/), registered into cepe_c by
 * module.c through cepe_rope_methods. Validation of values lives in the core;
 * this file only converts Python objects. cepe/rope.py is the friendly API. */
#include "bind.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "../csrc/cepe.h"
#include "../csrc/rope/rope.h"

/* ------------------------------------------------------ settings dict -> C */

typedef enum { F_DOUBLE, F_INT, F_BOOL, F_TYPE, F_LAYOUT, F_SHORT, F_LONG } field_kind;

typedef struct {
    const char *key;
    field_kind kind;
    size_t offset; /* into cepe_rope_config, for the scalar kinds */
} field_spec;

#define FIELD(key, kind, member) {key, kind, offsetof(cepe_rope_config, member)}
static const field_spec fields[] = {
    {"rope_type", F_TYPE, 0},
    {"layout", F_LAYOUT, 0},
    FIELD("rope_theta", F_DOUBLE, theta),
    FIELD("head_dim", F_INT, head_dim),
    FIELD("rotary_dim", F_INT, rotary_dim),
    FIELD("factor", F_DOUBLE, factor),
    FIELD("original_max_position_embeddings", F_INT, original_max_pos),
    FIELD("max_position_embeddings", F_INT, max_pos),
    FIELD("low_freq_factor", F_DOUBLE, low_freq_factor),
    FIELD("high_freq_factor", F_DOUBLE, high_freq_factor),
    FIELD("beta_fast", F_DOUBLE, beta_fast),
    FIELD("beta_slow", F_DOUBLE, beta_slow),
    FIELD("mscale", F_DOUBLE, mscale),
    FIELD("mscale_all_dim", F_DOUBLE, mscale_all_dim),
    FIELD("attention_factor", F_DOUBLE, attention_factor),
    FIELD("truncate", F_BOOL, truncate),
    {"short_factor", F_SHORT, 0},
    {"long_factor", F_LONG, 0},
};
#undef FIELD
#define N_FIELDS (sizeof fields / sizeof fields[0])

/* The settings being converted, plus the float32 arrays the factor pointers
 * borrow from (released by settings_release). */
typedef struct {
    cepe_rope_config rc;
    PyArrayObject *factor_arrays[2];
} settings;

static void settings_release(settings *s) {
    Py_CLEAR(s->factor_arrays[0]);
    Py_CLEAR(s->factor_arrays[1]);
}

static int set_double(double *dst, PyObject *v, const char *key) {
    if (v == Py_None) { /* None = unset, as in an HF config */
        *dst = NAN;
        return 0;
    }
    if (PyBool_Check(v) || !PyNumber_Check(v)) {
        PyErr_Format(PyExc_TypeError, "rope settings: %s must be a number or None, got %R", key, v);
        return -1;
    }
    *dst = PyFloat_AsDouble(v);
    return *dst == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static int set_int(int *dst, PyObject *v, const char *key) {
    if (v == Py_None) {
        *dst = 0;
        return 0;
    }
    if (PyBool_Check(v) || !PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "rope settings: %s must be an integer or None, got %R", key, v);
        return -1;
    }
    int overflow = 0;
    long x = PyLong_AsLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (overflow || x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "rope settings: %s is out of the int32 range: %R", key, v);
        return -1;
    }
    *dst = (int)x;
    return 0;
}

static int set_name(PyObject *v, const char *key, int is_type, cepe_rope_config *rc) {
    const char *name = PyUnicode_Check(v) ? PyUnicode_AsUTF8(v) : NULL;
    if (!name) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "rope settings: %s must be a string, got %R", key, v);
        return -1;
    }
    int bad = is_type ? cepe_rope_type_parse(name, &rc->type) : cepe_rope_layout_parse(name, &rc->layout);
    if (bad)
        PyErr_Format(PyExc_ValueError, "rope settings: unknown %s %R (expected %s)", key, v,
                     is_type ? "'default', 'linear', 'dynamic', 'yarn', 'llama3' or 'longrope'"
                             : "'half' or 'interleaved'");
    return bad ? -1 : 0;
}

/* A float32 copy (or view) of a longrope factor list; the length is checked
 * against rotary_dim once every key has been read. */
static int set_factors(settings *s, int which, PyObject *v, const char *key) {
    Py_CLEAR(s->factor_arrays[which]);
    if (v == Py_None) return 0;
    PyObject *a = PyArray_FROMANY(v, NPY_FLOAT32, 1, 1, NPY_ARRAY_CARRAY | NPY_ARRAY_FORCECAST);
    if (!a) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "rope settings: %s must be a 1-D list of numbers, got %R", key, v);
        return -1;
    }
    s->factor_arrays[which] = (PyArrayObject *)a;
    return 0;
}

static int set_field(settings *s, const field_spec *f, PyObject *v) {
    char *base = (char *)&s->rc;
    switch (f->kind) {
    case F_DOUBLE:
        return set_double((double *)(base + f->offset), v, f->key);
    case F_INT:
        return set_int((int *)(base + f->offset), v, f->key);
    case F_BOOL: {
        int t = PyObject_IsTrue(v);
        if (t < 0) return -1;
        *(int *)(base + f->offset) = t;
        return 0;
    }
    case F_TYPE:
        return set_name(v, f->key, 1, &s->rc);
    case F_LAYOUT:
        return set_name(v, f->key, 0, &s->rc);
    case F_SHORT:
        return set_factors(s, 0, v, f->key);
    case F_LONG:
        return set_factors(s, 1, v, f->key);
    }
    return -1;
}

static const field_spec *find_field(PyObject *key) {
    const char *name = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
    if (!name) return NULL;
    for (size_t i = 0; i < N_FIELDS; i++)
        if (strcmp(name, fields[i].key) == 0) return &fields[i];
    return NULL;
}

static int attach_factors(settings *s) {
    static const char *const keys[2] = {"short_factor", "long_factor"};
    const float **dst[2] = {&s->rc.short_factor, &s->rc.long_factor};
    const npy_intp want = s->rc.rotary_dim / 2;
    for (int k = 0; k < 2; k++) {
        PyArrayObject *a = s->factor_arrays[k];
        *dst[k] = NULL;
        if (!a) continue;
        if (PyArray_DIM(a, 0) != want) {
            PyErr_Format(PyExc_ValueError, "rope_scaling.%s must have %zd entries (rotary_dim/2), got %zd",
                         keys[k], (Py_ssize_t)want, (Py_ssize_t)PyArray_DIM(a, 0));
            return -1;
        }
        *dst[k] = (const float *)PyArray_DATA(a);
    }
    return 0;
}

/* Fills s from a settings dict (the keys of cepe.rope.RopeSettings.to_core);
 * missing keys keep cepe_rope_config_init's defaults, unknown keys fail. */
static int settings_from_dict(PyObject *d, settings *s) {
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "rope settings must be a dict, got %s", Py_TYPE(d)->tp_name);
        return -1;
    }
    cepe_rope_config_init(&s->rc, 10000.0, 0);
    int rotary_given = 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d, &pos, &key, &value)) {
        const field_spec *f = find_field(key);
        if (!f) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "rope settings: unknown key %R", key);
            return -1;
        }
        if (set_field(s, f, value) < 0) return -1;
        if (strcmp(f->key, "rotary_dim") == 0) rotary_given = value != Py_None;
    }
    if (!rotary_given) s->rc.rotary_dim = s->rc.head_dim;
    return attach_factors(s);
}

int rope_config_from_dict(PyObject *d, cepe_rope_config *rc, PyObject *keep[2]) {
    keep[0] = keep[1] = NULL;
    settings s = {0};
    if (settings_from_dict(d, &s) < 0) {
        settings_release(&s);
        return -1;
    }
    *rc = s.rc;
    keep[0] = (PyObject *)s.factor_arrays[0]; /* ownership moves to the caller */
    keep[1] = (PyObject *)s.factor_arrays[1];
    return 0;
}

/* ------------------------------------------------------------- functions */

static PyObject *rope_frequencies(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *d;
    int seq_len = 0;
    if (!PyArg_ParseTuple(args, "O|i:rope_frequencies", &d, &seq_len)) return NULL;
    settings s = {0};
    if (settings_from_dict(d, &s) < 0) {
        settings_release(&s);
        return NULL;
    }
    cepe_status st = cepe_rope_check(&s.rc);
    if (st) {
        settings_release(&s);
        return raise_status(st);
    }
    npy_intp half = s.rc.rotary_dim / 2;
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, &half, NPY_FLOAT32);
    float magnitude = 1.0f;
    if (out) st = cepe_rope_frequencies(&s.rc, seq_len, (float *)PyArray_DATA(out), &magnitude);
    settings_release(&s);
    if (!out) return NULL;
    if (st) {
        Py_DECREF(out);
        return raise_status(st);
    }
    return Py_BuildValue("(Nd)", (PyObject *)out, (double)magnitude);
}

static PyObject *e2llm_positions(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw) {
    static char *names[] = {"R", "L", "g_max", "n", "seed", NULL};
    int R, L, g_max, n = 1;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iii|iK:e2llm_positions", names, &R, &L, &g_max, &n, &seed))
        return NULL;
    cepe_status st = cepe_e2llm_check(R, L, g_max, n);
    if (st) return raise_status(st);
    npy_intp pdims[2] = {n, R}, sdims[1] = {n};
    PyArrayObject *pos = (PyArrayObject *)PyArray_SimpleNew(2, pdims, NPY_FLOAT64);
    PyArrayObject *scales = (PyArrayObject *)PyArray_SimpleNew(1, sdims, NPY_INT32);
    PyArrayObject *offsets = (PyArrayObject *)PyArray_SimpleNew(1, sdims, NPY_INT32);
    if (!pos || !scales || !offsets) goto fail;
    Py_BEGIN_ALLOW_THREADS st =
        cepe_e2llm_positions(R, L, g_max, n, (uint64_t)seed, (double *)PyArray_DATA(pos),
                             (int32_t *)PyArray_DATA(scales), (int32_t *)PyArray_DATA(offsets));
    Py_END_ALLOW_THREADS if (st) {
        raise_status(st);
        goto fail;
    }
    return Py_BuildValue("(NNN)", (PyObject *)pos, (PyObject *)scales, (PyObject *)offsets);
fail:
    Py_XDECREF(pos);
    Py_XDECREF(scales);
    Py_XDECREF(offsets);
    return NULL;
}

PyMethodDef cepe_rope_methods[] = {
    {"rope_frequencies", rope_frequencies, METH_VARARGS,
     "rope_frequencies(settings: dict, seq_len: int = 0) -> (inv_freq float32 (rotary_dim/2,), magnitude)\n"
     "Per-pair RoPE inverse frequencies and cos/sin magnitude (see cepe.rope)."},
    {"e2llm_positions", (PyCFunction)(void (*)(void))e2llm_positions, METH_VARARGS | METH_KEYWORDS,
     "e2llm_positions(R, L, g_max, n=1, seed=0) -> (positions float64 (n, R), scales int32 (n,), "
     "offsets int32 (n,))\nE2-LLM training positions (see cepe.rope)."},
    {NULL, NULL, 0, NULL},
};
