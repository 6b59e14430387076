/* train_bindings.c — CPython face of the training code (csrc/train/, the
 * "training" section of cepe.h), registered into cepe_c by module.c through
 * cepe_train_methods. cepe/train.py is the friendly API (cepe.Trainer).
 *
 * Arrays are taken as they are (bind.h): no silent copies, since the
 * optimizer must update the caller's buffers in place. The GIL is released
 * around every call that computes. */
#include "bind.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "../csrc/cepe.h"

/* ---------------------------------------------------------------- optimizer */

static PyObject *py_lr_schedule(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    static char *kw[] = {"base_lr", "step", "warmup_ratio", "total_steps", NULL};
    double base_lr, ratio;
    long step, total;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dldl:lr_schedule", kw, &base_lr, &step, &ratio, &total))
        return NULL;
    if (step < 0 || total < 1 || !(ratio >= 0.0 && ratio <= 1.0))
        return PyErr_Format(PyExc_ValueError, "need step >= 0, total_steps >= 1 and warmup_ratio in [0, 1]");
    return PyFloat_FromDouble(cepe_lr_at(base_lr, step, cepe_warmup_steps(ratio, total), total));
}

/* adamw_step(params, grads, m, v, *, step, lr, beta1, beta2, eps, weight_decay, clip, n_threads) -> norm */
static PyObject *py_adamw_step(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    static char *kw[] = {"params", "grads",        "m",    "v",         "step", "lr", "beta1", "beta2",
                         "eps",    "weight_decay", "clip", "n_threads", NULL};
    PyObject *o[4];
    long step = 0;
    cepe_train_config d; /* the core's defaults for what is not given */
    cepe_train_config_init(&d);
    double lr = NAN, wd = d.weight_decay, clip = d.clip;
    cepe_adamw_config h = d.adam;
    int nt = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|$lddddddi:adamw_step", kw, &o[0], &o[1], &o[2], &o[3],
                                     &step, &lr, &h.beta1, &h.beta2, &h.eps, &wd, &clip, &nt) ||
        bind_threads(nt) < 0)
        return NULL;
    static const char *names[4] = {"params", "grads", "m", "v"};
    PyArrayObject *a[4];
    for (int i = 0; i < 4; i++) {
        if (!(a[i] = bind_array(o[i], names[i], NPY_FLOAT32, 1, BIND_WRITE))) return NULL;
        if (PyArray_DIM(a[i], 0) != PyArray_DIM(a[0], 0))
            return PyErr_Format(PyExc_ValueError, "%s must have as many entries as params", names[i]);
    }
    if (step < 1)
        return PyErr_Format(PyExc_ValueError, "step must be given and >= 1 (AdamW's t), got %ld", step);
    if (!isfinite(lr) || lr < 0.0) return PyErr_Format(PyExc_ValueError, "lr must be given, finite and >= 0");
    float *p = PyArray_DATA(a[0]), *g = PyArray_DATA(a[1]), *mm = PyArray_DATA(a[2]),
          *vv = PyArray_DATA(a[3]);
    const size_t n = (size_t)PyArray_DIM(a[0], 0);
    double norm;
    Py_BEGIN_ALLOW_THREADS norm = cepe_clip_grad_norm(g, n, clip, nt);
    cepe_adamw_update(p, g, mm, vv, n, lr, &h, wd, step, nt);
    Py_END_ALLOW_THREADS return PyFloat_FromDouble(norm);
}

/* ------------------------------------------------------------ model access */

static int parse_trainable(const char *s, cepe_trainable *out) {
    if (!strcmp(s, "cross_attn"))
        *out = CEPE_TRAIN_CROSS_ATTN;
    else if (!strcmp(s, "cross_attn+encoder"))
        *out = CEPE_TRAIN_CROSS_ATTN_ENCODER;
    else if (!strcmp(s, "all"))
        *out = CEPE_TRAIN_ALL;
    else {
        PyErr_Format(PyExc_ValueError,
                     "trainable must be 'cross_attn', 'cross_attn+encoder' or 'all', got '%s'", s);
        return -1;
    }
    return 0;
}

/* train_layout(core, trainable) -> ([(name, shape, offset), ...], n_params) */
static PyObject *py_train_layout(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *core;
    const char *which_s;
    cepe_trainable which;
    if (!PyArg_ParseTuple(args, "Os:train_layout", &core, &which_s)) return NULL;
    cepe_model *m = bind_model(core);
    if (!m || parse_trainable(which_s, &which) < 0) return NULL;
    int n;
    size_t n_params;
    cepe_status st = cepe_train_layout(m, which, &n, &n_params);
    if (st) return raise_status(st);
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (int i = 0; i < n; i++) {
        const char *name;
        int ndim;
        int64_t shape[2];
        size_t off;
        if ((st = cepe_train_tensor(m, which, i, &name, &ndim, shape, &off))) {
            Py_DECREF(list);
            return raise_status(st);
        }
        PyObject *item = ndim == 2 ? Py_BuildValue("(s(LL)n)", name, (long long)shape[0], (long long)shape[1],
                                                   (Py_ssize_t)off)
                                   : Py_BuildValue("(s(L)n)", name, (long long)shape[0], (Py_ssize_t)off);
        if (!item) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return Py_BuildValue("(Nn)", list, (Py_ssize_t)n_params);
}

/* Weight i of a model (cepe_model_weight_at's view of it); 0 past the last one. */
typedef struct {
    const char *name;
    const float *data; /* NULL while unbound */
    int ndim;
    int64_t shape[2];
} weight_view;

static int weight_at(const cepe_model *m, int i, weight_view *w) {
    return cepe_model_weight_at(m, i, &w->name, &w->data, &w->ndim, w->shape) == CEPE_OK;
}

/* train_weights(core) -> {name: read-only float32 view}, every bound weight;
 * a matrix held in a stored format (quant/quant.h) as (read-only uint8 view
 * (n_out, row bytes), GGML type id, n_in) instead. The views borrow the
 * model's memory, so each keeps `core` (and with it the arrays it binds)
 * alive. */
static PyObject *py_train_weights(PyObject *Py_UNUSED(m), PyObject *core) {
    cepe_model *m = bind_model(core);
    if (!m) return NULL;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    weight_view w;
    for (int i = 0; weight_at(m, i, &w); i++) {
        if (!w.data) continue;
        npy_intp dims[2] = {(npy_intp)w.shape[0], (npy_intp)w.shape[1]};
        if (cepe_model_on_device(m)) { /* device memory: a host copy */
            PyObject *a = PyArray_SimpleNew(w.ndim, dims, NPY_FLOAT32);
            if (!a) goto fail;
            cepe_status st;
            Py_BEGIN_ALLOW_THREADS st =
                cepe_model_read_weight(m, i, (float *)PyArray_DATA((PyArrayObject *)a));
            Py_END_ALLOW_THREADS if (st || PyDict_SetItemString(d, w.name, a) < 0) {
                Py_DECREF(a);
                if (st) raise_status(st);
                goto fail;
            }
            Py_DECREF(a);
            continue;
        }
        int qtype = 0;
        size_t nbytes = 0;
        if (cepe_model_weight_format(m, i, &qtype, &nbytes) != CEPE_OK) goto fail;
        const npy_intp n_in = dims[1];
        if (qtype) dims[1] = (npy_intp)(nbytes / (size_t)dims[0]);
        PyObject *a = PyArray_New(&PyArray_Type, w.ndim, dims, qtype ? NPY_UINT8 : NPY_FLOAT32, NULL,
                                  (void *)w.data, 0, NPY_ARRAY_CARRAY_RO, NULL);
        if (!a) goto fail;
        Py_INCREF(core);
        if (PyArray_SetBaseObject((PyArrayObject *)a, core) < 0) {
            Py_DECREF(a);
            goto fail;
        }
        PyObject *item = qtype ? Py_BuildValue("(Nin)", a, qtype, (Py_ssize_t)n_in) : a;
        if (!item || PyDict_SetItemString(d, w.name, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

/* weight_shapes(core) -> [(name, shape), ...]: every weight the model declares, bound or not,
 * in binding order (the C core's parameter table; a tied lm_head is not one of its own) */
static PyObject *py_weight_shapes(PyObject *Py_UNUSED(m), PyObject *core) {
    cepe_model *m = bind_model(core);
    if (!m) return NULL;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    weight_view w;
    for (int i = 0; weight_at(m, i, &w); i++) {
        PyObject *item = w.ndim == 2
                             ? Py_BuildValue("(s(LL))", w.name, (long long)w.shape[0], (long long)w.shape[1])
                             : Py_BuildValue("(s(L))", w.name, (long long)w.shape[0]);
        if (!item || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* ------------------------------------------------------------- TrainState */

typedef struct {
    PyObject_HEAD cepe_train *t;
    PyObject *core, *params, *adam_m, *adam_v; /* kept alive: the state borrows them */
    Py_ssize_t n_params;
    int busy; /* guarded by the GIL, as module.c's Context */
} TrainStateObject;

static void TrainState_dealloc(TrainStateObject *self) {
    cepe_train_free(self->t);
    Py_XDECREF(self->core);
    Py_XDECREF(self->params);
    Py_XDECREF(self->adam_m);
    Py_XDECREF(self->adam_v);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int claim(TrainStateObject *self) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "this training state is in use by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static PyObject *stats_dict(const cepe_train_stats *s, int update) {
    if (update) return Py_BuildValue("{s:d,s:d}", "grad_norm", s->grad_norm, "lr", s->lr);
    return Py_BuildValue("{s:d,s:d,s:d,s:l}", "loss", s->loss, "lm_loss", s->lm_loss, "kl_loss", s->kl_loss,
                         "tokens", s->tokens);
}

/* forward_backward(input_ids, attention_mask, labels, positions, encoder_input_ids,
 *                  encoder_attention_mask, distill_prob, distill_index, grad_scale) -> dict */
static PyObject *TrainState_forward_backward(TrainStateObject *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"input_ids",
                         "attention_mask",
                         "labels",
                         "positions",
                         "encoder_input_ids",
                         "encoder_attention_mask",
                         "distill_prob",
                         "distill_index",
                         "grad_scale",
                         NULL};
    PyObject *o[8] = {NULL, Py_None, Py_None, Py_None, Py_None, Py_None, Py_None, Py_None};
    double grad_scale = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OOOOOOOd:forward_backward", kw, &o[0], &o[1], &o[2],
                                     &o[3], &o[4], &o[5], &o[6], &o[7], &grad_scale))
        return NULL;
    PyArrayObject *ids = bind_array(o[0], "input_ids", NPY_INT32, 2, 0), *mask, *labels, *pos, *eids, *emask,
                  *prob, *idx;
    if (!ids || bind_optional_array(o[1], "attention_mask", NPY_UINT8, 2, &mask) < 0 ||
        bind_optional_array(o[2], "labels", NPY_INT32, 2, &labels) < 0 ||
        bind_optional_array(o[3], "positions", NPY_FLOAT64, 2, &pos) < 0 ||
        bind_optional_array(o[4], "encoder_input_ids", NPY_INT32, 3, &eids) < 0 ||
        bind_optional_array(o[5], "encoder_attention_mask", NPY_UINT8, 3, &emask) < 0 ||
        bind_optional_array(o[6], "distill_prob", NPY_UINT16, 3, &prob) < 0 ||
        bind_optional_array(o[7], "distill_index", NPY_INT32, 3, &idx) < 0)
        return NULL;
    const npy_intp B = PyArray_DIM(ids, 0), T = PyArray_DIM(ids, 1);
    if (B < 1 || T < 1 || B > INT32_MAX || T > INT32_MAX)
        return PyErr_Format(PyExc_ValueError, "input_ids must be (B, T) with B, T >= 1");
    const npy_intp bt[2] = {B, T};
    if ((mask && bind_dims(mask, "attention_mask", 2, bt) < 0) ||
        (labels && bind_dims(labels, "labels", 2, bt) < 0) || (pos && bind_dims(pos, "positions", 2, bt) < 0))
        return NULL;
    cepe_train_batch b = {.B = (int)B, .T = (int)T, .input_ids = PyArray_DATA(ids)};
    b.attention_mask = mask ? PyArray_DATA(mask) : NULL;
    b.labels = labels ? PyArray_DATA(labels) : NULL;
    b.positions = pos ? PyArray_DATA(pos) : NULL;
    if (eids) {
        const npy_intp *ed = PyArray_DIMS(eids);
        if (ed[0] != B || ed[1] < 1 || ed[2] < 1 || ed[1] > INT32_MAX || ed[2] > INT32_MAX)
            return PyErr_Format(PyExc_ValueError,
                                "encoder_input_ids must be (B=%zd, n_ctx, L) with n_ctx, L >= 1",
                                (Py_ssize_t)B);
        if (emask && bind_dims(emask, "encoder_attention_mask", 3, ed) < 0) return NULL;
        b.n_ctx = (int)ed[1], b.L = (int)ed[2];
        b.encoder_input_ids = PyArray_DATA(eids);
        b.encoder_attention_mask = emask ? PyArray_DATA(emask) : NULL;
    } else if (emask)
        return PyErr_Format(PyExc_ValueError, "encoder_attention_mask given without encoder_input_ids");
    if (!prob != !idx) return PyErr_Format(PyExc_ValueError, "distill_prob and distill_index go together");
    if (prob) {
        const npy_intp *pd = PyArray_DIMS(prob), *id = PyArray_DIMS(idx);
        if (pd[0] != B || id[0] != B || pd[1] != id[1] || pd[2] != id[2] + 1 || id[2] < 1 || pd[1] > T)
            return PyErr_Format(
                PyExc_ValueError,
                "distill_prob must be (B, T_kl, K+1) and distill_index (B, T_kl, K) with T_kl <= T = "
                "%zd, K >= 1; got (%zd, %zd, %zd) and (%zd, %zd, %zd)",
                (Py_ssize_t)T, (Py_ssize_t)pd[0], (Py_ssize_t)pd[1], (Py_ssize_t)pd[2], (Py_ssize_t)id[0],
                (Py_ssize_t)id[1], (Py_ssize_t)id[2]);
        b.T_kl = (int)pd[1], b.K = (int)id[2];
        b.distill_prob = PyArray_DATA(prob);
        b.distill_index = PyArray_DATA(idx);
    }
    if (claim(self) < 0) return NULL;
    cepe_train_stats stats = {0};
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st = cepe_train_forward_backward(self->t, &b, grad_scale, &stats);
    Py_END_ALLOW_THREADS self->busy = 0;
    if (st) return raise_status(st);
    return stats_dict(&stats, 0);
}

static PyObject *TrainState_update(TrainStateObject *self, PyObject *Py_UNUSED(a)) {
    if (claim(self) < 0) return NULL;
    cepe_train_stats stats = {0};
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st = cepe_train_update(self->t, &stats);
    Py_END_ALLOW_THREADS self->busy = 0;
    if (st) return raise_status(st);
    return stats_dict(&stats, 1);
}

static PyObject *TrainState_zero_grad(TrainStateObject *self, PyObject *Py_UNUSED(a)) {
    if (claim(self) < 0) return NULL;
    cepe_train_zero_grad(self->t);
    self->busy = 0;
    Py_RETURN_NONE;
}

/* grads() -> a copy of the flat gradient buffer (n_params,) */
static PyObject *TrainState_grads(TrainStateObject *self, PyObject *Py_UNUSED(a)) {
    npy_intp n = self->n_params;
    PyObject *out = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    if (!out) return NULL;
    if (claim(self) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st = cepe_train_copy_grads(self->t, (float *)PyArray_DATA((PyArrayObject *)out));
    Py_END_ALLOW_THREADS self->busy = 0;
    if (st) {
        Py_DECREF(out);
        return raise_status(st);
    }
    return out;
}

/* grad_buffer() -> the flat gradient buffer itself, a writable float32 view
 * (n_params,) that keeps this state alive: an all-reduce averages it in place
 * between the backward passes and update(). CPU states only (a device's
 * buffer is device memory: grad_dlpack). */
static PyObject *TrainState_grad_buffer(TrainStateObject *self, PyObject *Py_UNUSED(a)) {
    float *g;
    size_t n;
    int on_device;
    cepe_status st = cepe_train_grad_buffer(self->t, &g, &n, &on_device);
    if (st) return raise_status(st);
    if (on_device)
        return PyErr_Format(PyExc_RuntimeError,
                            "the gradients of a model on a device live in device memory: use grad_dlpack()");
    npy_intp dims[1] = {(npy_intp)n};
    PyObject *a = PyArray_New(&PyArray_Type, 1, dims, NPY_FLOAT32, NULL, g, 0, NPY_ARRAY_CARRAY, NULL);
    if (!a) return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)a, (PyObject *)self) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* DLPack's C ABI (dmlc/dlpack, dlpack.h v0.8: the unversioned DLManagedTensor
 * that a "dltensor" capsule carries), declared here so that the build does
 * not need the header of any one framework. */
typedef struct {
    int32_t device_type; /* DLDeviceType: kDLCPU = 1, kDLCUDA = 2 */
    int32_t device_id;
} DLDevice;
typedef struct {
    uint8_t code; /* kDLFloat = 2 */
    uint8_t bits;
    uint16_t lanes;
} DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* NULL: compact, row-major */
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
    DLManagedTensor mt; /* first: the consumer frees through its address */
    int64_t shape[1];
} GradTensor;

/* Called by the consumer (any thread) when it drops the tensor: releases the state. */
static void grad_tensor_delete(DLManagedTensor *mt) {
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF((PyObject *)mt->manager_ctx);
    PyMem_RawFree(mt);
    PyGILState_Release(g);
}

/* A capsule nobody consumed still owns its tensor (a consumer renames it "used_dltensor"). */
static void grad_capsule_destroy(PyObject *cap) {
    if (!PyCapsule_IsValid(cap, "dltensor")) return;
    DLManagedTensor *mt = PyCapsule_GetPointer(cap, "dltensor");
    if (mt && mt->deleter) mt->deleter(mt);
}

/* grad_dlpack(device_id=0) -> a "dltensor" capsule over the flat gradient
 * buffer (float32, (n_params,)), where it lives: device memory of CUDA device
 * device_id for a model on a GPU, host memory (kDLCPU) otherwise. No copy:
 * torch.from_dlpack(capsule) aliases the buffer and keeps this state alive. */
static PyObject *TrainState_grad_dlpack(TrainStateObject *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"device_id", NULL};
    int device_id = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|i:grad_dlpack", kw, &device_id)) return NULL;
    if (device_id < 0) return PyErr_Format(PyExc_ValueError, "device_id must be >= 0, got %d", device_id);
    float *g;
    size_t n;
    int on_device;
    cepe_status st = cepe_train_grad_buffer(self->t, &g, &n, &on_device);
    if (st) return raise_status(st);
    GradTensor *gt = PyMem_RawCalloc(1, sizeof *gt);
    if (!gt) return PyErr_NoMemory();
    gt->shape[0] = (int64_t)n;
    gt->mt.dl_tensor = (DLTensor){.data = g,
                                  .device = {on_device ? 2 : 1, on_device ? device_id : 0},
                                  .ndim = 1,
                                  .dtype = {2, 32, 1},
                                  .shape = gt->shape};
    gt->mt.manager_ctx = self;
    gt->mt.deleter = grad_tensor_delete;
    Py_INCREF(self);
    PyObject *cap = PyCapsule_New(&gt->mt, "dltensor", grad_capsule_destroy);
    if (!cap) grad_tensor_delete(&gt->mt);
    return cap;
}

/* Runs one of the host <-> device copies of the training state, GIL released. */
static PyObject *run_sync(TrainStateObject *self, cepe_status (*fn)(cepe_train *)) {
    if (claim(self) < 0) return NULL;
    cepe_status st;
    Py_BEGIN_ALLOW_THREADS st = fn(self->t);
    Py_END_ALLOW_THREADS self->busy = 0;
    if (st) return raise_status(st);
    Py_RETURN_NONE;
}

static PyObject *TrainState_sync_device(TrainStateObject *self, PyObject *Py_UNUSED(a)) {
    return run_sync(self, cepe_train_sync_device);
}

/* sync_host(): on a device, writes the weights and moments back into the
 * params / m / v arrays (before saving); a no-op on the CPU. */
static PyObject *TrainState_sync_host(TrainStateObject *self, PyObject *Py_UNUSED(a)) {
    return run_sync(self, cepe_train_sync_host);
}

static PyObject *TrainState_get_step(TrainStateObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromLong(cepe_train_steps(self->t));
}

static int TrainState_set_step(TrainStateObject *self, PyObject *v, void *Py_UNUSED(c)) {
    long s = v ? PyLong_AsLong(v) : -1;
    if (s == -1 && PyErr_Occurred()) return -1;
    if (s < 0) {
        PyErr_SetString(PyExc_ValueError, "step must be an int >= 0");
        return -1;
    }
    cepe_train_set_steps(self->t, s);
    return 0;
}

static PyMethodDef TrainState_methods[] = {
    {"forward_backward", (PyCFunction)(void (*)(void))TrainState_forward_backward,
     METH_VARARGS | METH_KEYWORDS,
     "forward_backward(input_ids, attention_mask=None, labels=None, positions=None, encoder_input_ids=None, "
     "encoder_attention_mask=None, distill_prob=None, distill_index=None, grad_scale=1) -> losses; "
     "adds the gradients"},
    {"update", (PyCFunction)TrainState_update, METH_NOARGS,
     "clip + AdamW at the scheduled lr -> {grad_norm, lr}"},
    {"zero_grad", (PyCFunction)TrainState_zero_grad, METH_NOARGS, "set every gradient to zero"},
    {"grads", (PyCFunction)TrainState_grads, METH_NOARGS, "a copy of the flat gradient buffer"},
    {"grad_buffer", (PyCFunction)TrainState_grad_buffer, METH_NOARGS,
     "the flat gradient buffer itself (a writable float32 view; CPU states)"},
    {"grad_dlpack", (PyCFunction)(void (*)(void))TrainState_grad_dlpack, METH_VARARGS | METH_KEYWORDS,
     "grad_dlpack(device_id=0) -> a DLPack capsule over the flat gradient buffer where it lives (no copy)"},
    {"sync_host", (PyCFunction)TrainState_sync_host, METH_NOARGS,
     "device backends: copy the weights and moments back into params / m / v"},
    {"sync_device", (PyCFunction)TrainState_sync_device, METH_NOARGS,
     "device backends: copy params / m / v (edited on the host) to the device"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef TrainState_getset[] = {
    {"step", (getter)TrainState_get_step, (setter)TrainState_set_step, "optimizer steps taken", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TrainStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cepe_c.TrainState",
    .tp_basicsize = sizeof(TrainStateObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The training state of a CEPE model (cepe_train in cepe.h); made by cepe_c.train_state().",
    .tp_dealloc = (destructor)TrainState_dealloc,
    .tp_methods = TrainState_methods,
    .tp_getset = TrainState_getset,
};

static int cfg_double(PyObject *d, const char *key, double *dst) {
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed */
    if (!v) return 0;                           /* keep the default */
    *dst = PyFloat_AsDouble(v);
    return *dst == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* train_state(core, config dict, params, m, v, step=0) -> TrainState */
static PyObject *py_train_state(PyObject *Py_UNUSED(mod), PyObject *args, PyObject *kwds) {
    static char *kw[] = {"core", "config", "params", "m", "v", "step", NULL};
    PyObject *core, *cfg_d, *o[3];
    long step = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OOO|l:train_state", kw, &core, &PyDict_Type, &cfg_d,
                                     &o[0], &o[1], &o[2], &step))
        return NULL;
    if (PyType_Ready(&TrainStateType) < 0) return NULL;
    cepe_model *m = bind_model(core);
    if (!m) return NULL;
    cepe_train_config c; /* the core's defaults for the keys the dict lacks */
    cepe_train_config_init(&c);
    PyObject *tr = PyDict_GetItemString(cfg_d, "trainable");
    if (tr) {
        const char *s = PyUnicode_AsUTF8(tr);
        if (!s || parse_trainable(s, &c.trainable) < 0) return NULL;
    }
    PyObject *ts = PyDict_GetItemString(cfg_d, "total_steps"), *km = PyDict_GetItemString(cfg_d, "kl_mode");
    if (ts && (c.total_steps = PyLong_AsLong(ts)) == -1 && PyErr_Occurred()) return NULL;
    if (km && (c.kl_mode = (int)PyLong_AsLong(km)) == -1 && PyErr_Occurred()) return NULL;
    PyObject *lf = PyDict_GetItemString(cfg_d, "logit_floats");
    if (lf && (c.logit_floats = PyLong_AsLong(lf)) == -1 && PyErr_Occurred()) return NULL;
    if (cfg_double(cfg_d, "lr", &c.lr) < 0 || cfg_double(cfg_d, "weight_decay", &c.weight_decay) < 0 ||
        cfg_double(cfg_d, "warmup_ratio", &c.warmup_ratio) < 0 || cfg_double(cfg_d, "clip", &c.clip) < 0 ||
        cfg_double(cfg_d, "beta1", &c.adam.beta1) < 0 || cfg_double(cfg_d, "beta2", &c.adam.beta2) < 0 ||
        cfg_double(cfg_d, "eps", &c.adam.eps) < 0 || cfg_double(cfg_d, "lm_loss_cof", &c.lm_loss_cof) < 0 ||
        cfg_double(cfg_d, "kl_loss_cof", &c.kl_loss_cof) < 0 ||
        cfg_double(cfg_d, "kl_delta", &c.kl_delta) < 0)
        return NULL;
    int n_tensors;
    size_t n_params;
    cepe_status st = cepe_train_layout(m, c.trainable, &n_tensors, &n_params);
    if (st) return raise_status(st);
    static const char *names[3] = {"params", "m", "v"};
    PyArrayObject *a[3];
    for (int i = 0; i < 3; i++) {
        if (!(a[i] = bind_array(o[i], names[i], NPY_FLOAT32, 1, BIND_WRITE))) return NULL;
        if ((size_t)PyArray_DIM(a[i], 0) != n_params)
            return PyErr_Format(PyExc_ValueError, "%s must hold %zu floats (the layout's n_params), got %zd",
                                names[i], n_params, (Py_ssize_t)PyArray_DIM(a[i], 0));
    }
    TrainStateObject *self = PyObject_New(TrainStateObject, &TrainStateType);
    if (!self) return NULL;
    self->t = NULL;
    self->busy = 0;
    self->n_params = (Py_ssize_t)n_params;
    Py_INCREF(core), Py_INCREF(o[0]), Py_INCREF(o[1]), Py_INCREF(o[2]);
    self->core = core, self->params = o[0], self->adam_m = o[1], self->adam_v = o[2];
    st = cepe_train_create(m, &c, PyArray_DATA(a[0]), PyArray_DATA(a[1]), PyArray_DATA(a[2]), step, &self->t);
    if (st) {
        Py_DECREF(self);
        return raise_status(st);
    }
    return (PyObject *)self;
}

PyMethodDef cepe_train_methods[] = {
    {"train_layout", py_train_layout, METH_VARARGS,
     "train_layout(core, trainable) -> ([(name, shape, offset), ...], n_params): the flat-buffer layout"},
    {"weight_shapes", py_weight_shapes, METH_O,
     "weight_shapes(core) -> [(name, shape), ...]: every weight the model declares (bound or not), in "
     "binding order"},
    {"train_weights", py_train_weights, METH_O,
     "train_weights(core) -> {name: read-only float32 view of the bound weight}"},
    {"train_state", (PyCFunction)(void (*)(void))py_train_state, METH_VARARGS | METH_KEYWORDS,
     "train_state(core, config, params, m, v, step=0) -> TrainState over a model whose trainable weights are "
     "views of params"},
    {"lr_schedule", (PyCFunction)(void (*)(void))py_lr_schedule, METH_VARARGS | METH_KEYWORDS,
     "lr_schedule(base_lr, step, warmup_ratio, total_steps) -> the lr of 0-based optimizer step `step` "
     "(HF cosine with linear warmup)"},
    {"adamw_step", (PyCFunction)(void (*)(void))py_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(params, grads, m, v, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0, clip=1, "
     "n_threads=1) -> grad norm before clipping; clips grads and updates params, m, v in place"},
    {NULL, NULL, 0, NULL},
};
