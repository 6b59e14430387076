"""cepe.Trainer: training a CEPE model in the C core (spec CEPE.md §6).

    trainer = cepe.Trainer(model, "cross_attn+encoder", lr=5e-4, total_steps=4000, warmup_ratio=0.04)
    stats = trainer.step({"input_ids": ids, "encoder_input_ids": chunks})

Where the weights live. A loaded Model binds its weights read-only, often as
memory maps of the checkpoint, so training cannot write into them. The
Trainer therefore copies the trainable tensors into one flat fp32 buffer (the
master weights, tensor after tensor, in the layout the core reports), builds
a new core model that binds those tensors as views of the buffer and every
frozen tensor as the very memory the old core used (no copy, never written),
and gives that core to the Model (`model._core`). AdamW then updates the
buffer in place, so the Model's forward(), generate(), ... see each update at
once, and frozen weights stay bit-identical by construction. KV caches made
before the Trainer belong to the old core (the weights as loaded).

While a step runs the Model must not be used from another thread: the step
rewrites the weights that inference reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

import cepe_c

from .build import build_core
from .checks import check_seed
from .errors import CheckpointError
from .files import CONFIG_LIMIT, check_regular, describe, read_json
from .head import DECODER_KEY, SHARE_KEY, cross_attention_init
from .load import load
from .model import Model
from .progress import bar as progress_bar
from .qtensor import Weight, as_float32, core_weights
from .rope import e2llm_positions
from .safetensors_io import SafetensorsFile, write_safetensors
from .save import MODEL_FILES, fsync_path, write_json, write_model

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: saves take no locks
    fcntl = None  # type: ignore[assignment]

STATE_FORMAT = 1  # trainer_state.json's "format"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# Every file a checkpoint directory may hold: save() replaces a directory only when it holds
# nothing else (and a trainer_state.json), and removes a leftover of a killed save only then.
CHECKPOINT_FILES = frozenset((*MODEL_FILES, OPTIMIZER_FILE, STATE_FILE))
# What trainer_state.json must hold (logit_floats and n_params are optional).
STATE_KEYS = (
    "format",
    "step",
    "trainable",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "total_steps",
    "grad_accum",
    "clip",
    "betas",
    "eps",
    "lm_loss_cof",
    "kl_loss_cof",
    "kl_mode",
    "e2llm",
    "seed",
    "init",
    "layout",
)
INT_MAX = 2**63 - 1  # the C core counts steps (and takes total_steps, logit_floats) as int64

TRAINABLE = ("cross_attn", "cross_attn+encoder", "all")
INIT_MODES = ("none", "copy", "zero", "normal")
_BATCH_KEYS = {
    "input_ids",
    "attention_mask",
    "labels",
    "encoder_input_ids",
    "encoder_attention_mask",
    "distill_prob",
    "distill_index",
}


def parse_kl_mode(mode: str) -> tuple[int, float]:
    """'drop' -> (1, 0); 'smooth_<δ>' -> (0, δ); 'smooth' -> train.py's default δ = 1e-6."""
    if not isinstance(mode, str):
        raise TypeError(f"kl_mode must be a str ('drop' or 'smooth_<delta>'), got {type(mode).__name__}")
    if mode == "drop":
        return 1, 0.0
    if mode == "smooth":
        return 0, 1e-6
    m = re.fullmatch(r"smooth_(.+)", mode)
    if m:
        try:
            delta = float(m.group(1))
        except ValueError:
            delta = float("nan")
        if math.isfinite(delta) and delta >= 0:
            return 0, delta
    raise ValueError(f"kl_mode must be 'drop' or 'smooth_<delta>' with delta >= 0 (e.g. 'smooth_1e-6'), got {mode!r}")


def _number(name: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    try:
        v = float(v)
    except OverflowError:  # an int past float's range
        v = math.inf
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {v}")
    return v


def _int(name: str, v: Any, lo: int, hi: int = INT_MAX) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return int(v)


def _ints(batch: dict[str, Any], key: str, ndim: int) -> np.ndarray | None:
    if batch.get(key) is None:
        return None
    a = np.asarray(batch[key])
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"batch[{key!r}] must hold integers, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"batch[{key!r}] must have {ndim} dimensions, got shape {a.shape}")
    if a.size and (a.min() < -(2**31) or a.max() >= 2**31):
        raise ValueError(f"batch[{key!r}] holds values outside int32")
    return np.ascontiguousarray(a, dtype=np.int32)


def _mask(batch: dict[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if batch.get(key) is None:
        return None
    a = np.asarray(batch[key])
    if a.dtype != np.bool_ and not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"batch[{key!r}] must hold 0/1 numbers or booleans, got dtype {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"batch[{key!r}] has shape {a.shape}, expected {shape}")
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"batch[{key!r}] must hold only 0 and 1")
    return np.ascontiguousarray(a, dtype=np.uint8)


class Trainer:
    """Trains a CEPE Model in place (see the module docstring for where the weights live).

    trainable: "cross_attn" (the decoder and the encoder frozen; the encoder's
    output is detached), "cross_attn+encoder" (spec: --train_encoder) or "all"
    (every weight; small models). lr, weight_decay (AdamW's decoupled decay,
    applied to 2-D weights only, as HF Trainer exempts norm weights),
    warmup_ratio and total_steps define HF's cosine schedule with linear warmup
    (warmup steps = ceil(total_steps * warmup_ratio); with 0 the first step
    runs at the full lr). grad_accum: each step() splits its batch rows into
    this many micro-batches and averages their losses' gradients (HF's
    gradient accumulation). clip: max global gradient norm (<= 0: none).
    Loss = lm_loss_cof * CE + kl_loss_cof * KL (CEPED), kl_mode "drop" or
    "smooth_<delta>". e2llm: None, or {"g_max", "L", "per_sequence"} to train
    the decoder's self-attention at E2-LLM positions. seed: the init="normal"
    and E2-LLM draws. init: see _initialize. logit_floats: how many logits
    (rows x vocab) are formed at a time (0: 2^21), a memory knob.

    step() is zero_grad(), compute_gradients() and apply_update(); between the
    last two the gradients sit in one flat fp32 buffer (grad_buffer, or
    grad_dlpack() on a GPU, both without a copy), which a data-parallel run
    averages in place (cepe.distributed).
    """

    def __init__(
        self,
        model: Model,
        trainable: str = "cross_attn",
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        total_steps: int,
        grad_accum: int = 1,
        clip: float = 1.0,
        lm_loss_cof: float = 1.0,
        kl_loss_cof: float = 0.0,
        kl_mode: str = "smooth_1e-6",
        e2llm: dict[str, Any] | None = None,
        seed: int = 0,
        init: str = "none",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        logit_floats: int = 0,
    ) -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be a cepe.Model, got {type(model).__name__}")
        if model.device != "cpu" and model.dtype == "bfloat16":
            raise NotImplementedError(
                f"training needs float32 weights on {model.device}; this model was loaded with dtype='bfloat16' "
                "(on the CPU a bf16 or Q8_0 decoder trains with its frozen weights as they are)"
            )
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        self.e2llm = self._check_e2llm(e2llm, model)
        kl_code, kl_delta = parse_kl_mode(kl_mode)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError("betas must be a pair of numbers")
        self.model = model
        self.trainable = trainable
        self.grad_accum = _int("grad_accum", grad_accum, 1)
        self.seed = check_seed(seed)
        self.init = init
        # processes whose averaged gradients make each step (cepe.distributed sets it); saved, so
        # that a run resumes only with the micro-batches and reduction it started with
        self.world_size = 1
        self.config: dict[str, Any] = {
            "trainable": trainable,
            "lr": _number("lr", lr, 0.0),
            "weight_decay": _number("weight_decay", weight_decay, 0.0),
            "warmup_ratio": _number("warmup_ratio", warmup_ratio, 0.0, 1.0),
            "total_steps": _int("total_steps", total_steps, 1),
            "clip": _number("clip", clip),
            "beta1": _number("betas[0]", betas[0], 0.0, 1.0),
            "beta2": _number("betas[1]", betas[1], 0.0, 1.0),
            "eps": _number("eps", eps, 0.0, lo_open=True),
            "lm_loss_cof": _number("lm_loss_cof", lm_loss_cof),
            "kl_loss_cof": _number("kl_loss_cof", kl_loss_cof),
            "kl_mode": kl_code,
            "kl_delta": kl_delta,
            "logit_floats": _int("logit_floats", logit_floats, 0),
        }
        self.kl_mode = kl_mode
        if self.config["beta1"] >= 1.0 or self.config["beta2"] >= 1.0:
            raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")

        if model.config.raw.get(SHARE_KEY) and model.device != "cpu" and trainable != "cross_attn":
            raise NotImplementedError(
                f"trainable={trainable!r} with an encoder that shares the decoder's embedding table runs on the "
                "CPU only (a device holds the table twice, and would train the copy)"
            )
        old = model._core
        layout, n_params = cepe_c.train_layout(old, trainable)
        weights = core_weights(old)  # read-only views of what the old core binds
        self.layout: list[tuple[str, tuple[int, ...], int]] = [(n, tuple(s), o) for n, s, o in layout]
        self.params = np.zeros(n_params, dtype=np.float32)  # the fp32 master weights
        self.adam_m = np.zeros(n_params, dtype=np.float32)
        self.adam_v = np.zeros(n_params, dtype=np.float32)
        for name, _, _ in self.layout:
            self.tensor(name)[...] = as_float32(weights[name])
        self._initialize(weights)

        cfg = model.config
        trained = {name for name, _, _ in self.layout}
        shares = bool(cfg.raw.get(SHARE_KEY))  # the encoder reads the decoder's table, as trained or frozen there
        bound = (
            (name, self.tensor(name) if name in trained else w)
            for name, w in weights.items()
            if not (shares and name == "encoder.embed_tokens.weight")
        )
        # on a device, the weights live there and train there
        core = build_core(cfg, bound, n_threads=model.n_threads, device=model.device, where=model.path)
        self._state = cepe_c.train_state(core, self.config, self.params, self.adam_m, self.adam_v)
        model._core = core  # from now on the Model runs on the master weights

    # ------------------------------------------------------------ weights
    def tensor(self, name: str) -> np.ndarray:
        """The master weight of a trainable tensor: a writable view into the flat buffer.
        (On a device the weights train there; this view is brought up to date
        on each call. After editing it, call sync_device().)"""
        if getattr(self, "_state", None) is not None:
            self._state.sync_host()
        for n, shape, off in self.layout:
            if n == name:
                return self.params[off : off + int(np.prod(shape))].reshape(shape)
        raise KeyError(f"{name} is not a trainable tensor of this Trainer")

    def sync_host(self) -> None:
        """Brings params / adam_m / adam_v up to date with the device the model
        trains on (tensor() and save() do it themselves); a no-op on the CPU."""
        self._state.sync_host()

    def sync_device(self) -> None:
        """Pushes host-side edits of tensor() views (or of adam_m / adam_v) to
        the device the model trains on; a no-op on the CPU."""
        self._state.sync_device()

    @property
    def trainable_names(self) -> list[str]:
        return [n for n, _, _ in self.layout]

    def _initialize(self, weights: dict[str, Weight]) -> None:
        """Cross-attention initialisation (init: "copy", "zero", "normal", or "none" for the
        weights as loaded): cepe.head.cross_attention_init, drawn from `seed`."""
        if self.init == "none":
            return
        for name, w in cross_attention_init(self.model.config, weights, self.init, self.seed).items():
            self.tensor(name)[...] = w

    # ---------------------------------------------------------------- E2-LLM
    @staticmethod
    def _check_e2llm(e2llm: dict[str, Any] | None, model: Model) -> dict[str, Any] | None:
        """E2-LLM augmentation of the decoder's self-attention positions
        (ROPE_E2LLM.md §3.2): {"g_max": 20, "L": <base window, default
        max_position_embeddings>, "per_sequence": False}."""
        if e2llm is None:
            return None
        if not isinstance(e2llm, dict):
            raise TypeError(f"e2llm must be None or a dict, got {type(e2llm).__name__}")
        unknown = set(e2llm) - {"g_max", "L", "per_sequence"}
        if unknown:
            raise ValueError(f"unknown e2llm keys {sorted(unknown)} (expected g_max, L, per_sequence)")
        out = {
            "g_max": _int("e2llm['g_max']", e2llm.get("g_max", 20), 1),
            "L": _int("e2llm['L']", e2llm.get("L", model.config.max_position_embeddings), 1),
            "per_sequence": bool(e2llm.get("per_sequence", False)),
        }
        if out["g_max"] * out["L"] >= 2**31:
            raise ValueError("e2llm: g_max * L must fit in int32")
        return out

    def _positions(self, B: int, T: int, rows: tuple[int, int] | None = None) -> np.ndarray | None:
        """This step's E2-LLM positions (B, T), or None. The draw is seeded by
        (seed, step) alone, so a resumed run draws exactly what an
        uninterrupted one would, with no generator state to save. Default:
        one (g, t) per optimizer step shared by the batch (the paper's "per
        iteration"); per_sequence: one per row, drawn for the whole batch of
        rows[1] rows of which these are rows[0]..rows[0] + B - 1 (a rank's share
        of a data-parallel batch gets the rows it would get in one process)."""
        if self.e2llm is None:
            return None
        e = self.e2llm
        first, total = rows if rows is not None else (0, B)
        seed = (self.seed * 0x9E3779B97F4A7C15 + self._state.step + 1) % 2**64
        n = total if e["per_sequence"] else 1
        pos = e2llm_positions(T, e["L"], e["g_max"], n, seed).positions
        if e["per_sequence"]:
            pos = pos[first : first + B]
        return np.array(np.broadcast_to(pos, (B, T)), dtype=np.float64)  # a fresh, writable copy

    @property
    def step_count(self) -> int:
        """Optimizer steps taken."""
        return self._state.step

    # --------------------------------------------------------------- batch
    def _batch(self, batch: dict[str, Any]) -> dict[str, np.ndarray | None]:
        if not isinstance(batch, dict):
            raise TypeError(f"batch must be a dict of NumPy arrays, got {type(batch).__name__}")
        unknown = set(batch) - _BATCH_KEYS
        if unknown:
            raise ValueError(f"unknown batch keys {sorted(unknown)} (expected some of {sorted(_BATCH_KEYS)})")
        if batch.get("input_ids") is None:
            raise ValueError("batch['input_ids'] (B, T) is required")
        ids = _ints(batch, "input_ids", 2)
        assert ids is not None  # present, checked above
        out: dict[str, np.ndarray | None] = {"input_ids": ids}
        out["attention_mask"] = _mask(batch, "attention_mask", ids.shape)
        labels = _ints(batch, "labels", 2)
        if labels is not None and labels.shape != ids.shape:
            raise ValueError(f"batch['labels'] has shape {labels.shape}, input_ids has {ids.shape}")
        out["labels"] = labels
        enc = _ints(batch, "encoder_input_ids", 3)
        if enc is None and batch.get("encoder_attention_mask") is not None:
            raise ValueError("batch['encoder_attention_mask'] given without encoder_input_ids")
        out["encoder_input_ids"] = enc
        out["encoder_attention_mask"] = None if enc is None else _mask(batch, "encoder_attention_mask", enc.shape)
        prob, index = batch.get("distill_prob"), batch.get("distill_index")
        if (prob is None) != (index is None):
            raise ValueError("distill_prob and distill_index go together")
        if prob is not None:
            p = np.asarray(prob)
            if p.dtype == np.uint16:  # fp16 bits as stored by some pipelines
                p = p.view(np.float16)
            if not np.issubdtype(p.dtype, np.floating):
                raise TypeError(f"batch['distill_prob'] must be float16 (or float), got dtype {p.dtype}")
            # The teacher tables are fp16 in the reference (data/calculate_logits.py);
            # wider floats are rounded to fp16 as the reference stores them.
            out["distill_prob"] = np.ascontiguousarray(p, dtype=np.float16).view(np.uint16)
            out["distill_index"] = _ints(batch, "distill_index", 3)
        else:
            out["distill_prob"] = out["distill_index"] = None
        return out

    def _with_positions(
        self, arrays: dict[str, np.ndarray | None], rows: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray | None]:
        ids, mask = arrays["input_ids"], arrays["attention_mask"]
        assert ids is not None  # _batch requires it
        B, T = ids.shape
        if rows is not None:
            first, total = (_int("rows[0]", rows[0], 0), _int("rows[1]", rows[1], 1))
            if first + B > total:
                raise ValueError(f"rows=({first}, {total}): a batch of {B} rows does not fit at row {first}")
        pos = self._positions(B, T, rows)
        if pos is not None and mask is not None and not mask.all():
            raise ValueError("e2llm augmentation needs unpadded rows (attention_mask all 1)")
        return {**arrays, "positions": pos}

    def _micro(self, arrays: dict[str, np.ndarray | None]) -> list[dict[str, np.ndarray | None]]:
        ids = arrays["input_ids"]
        assert ids is not None  # _batch requires it
        B = ids.shape[0]
        if B % self.grad_accum:
            raise ValueError(f"the batch has {B} rows, not divisible into grad_accum={self.grad_accum} micro-batches")
        k = B // self.grad_accum
        return [
            {key: None if a is None else np.ascontiguousarray(a[i * k : (i + 1) * k]) for key, a in arrays.items()}
            for i in range(self.grad_accum)
        ]

    # ---------------------------------------------------------------- step
    # A step is zero_grad(), compute_gradients() and apply_update(); between the
    # last two, the gradients sit in one flat fp32 buffer (grad_buffer or
    # grad_dlpack) that a data-parallel run averages in place (cepe.distributed).
    def zero_grad(self) -> None:
        """Sets the gradient buffer to zero (the start of an optimizer step)."""
        self._state.zero_grad()

    def compute_gradients(
        self, batch: dict[str, Any], *, scale: float = 1.0, rows: tuple[int, int] | None = None
    ) -> dict[str, float]:
        """Forward and backward over `batch` (split into grad_accum micro-batches,
        each weighted 1 / grad_accum, as HF accumulates): scale times the
        gradient of its mean loss is ADDED to the gradient buffer; no update.
        Returns {loss, lm_loss, kl_loss} averaged over the micro-batches.
        rows=(first, total): the batch is rows first.. of a batch of `total`
        rows spread over processes (the E2-LLM per_sequence draws follow the
        whole batch); scale: 1 / world_size there."""
        scale = _number("scale", scale)
        micro = self._micro(self._with_positions(self._batch(batch), rows))
        total = {"loss": 0.0, "lm_loss": 0.0, "kl_loss": 0.0}
        for mb in micro:  # HF: each micro-batch's loss / grad_accum
            st = self._state.forward_backward(**mb, grad_scale=scale / len(micro))
            for key in total:
                total[key] += st[key] / len(micro)
        return total

    def apply_update(self) -> dict[str, float]:
        """Clips the gradient buffer to `clip`, runs AdamW at the scheduled lr
        and counts the step: {grad_norm (before clipping), lr}. Gradients whose
        norm is not finite (they overflowed float32) raise ValueError and
        change nothing. On the CPU, an update that overflows float32 (an lr far
        too large, or corrupt moments) raises ValueError naming the first
        tensor it broke; on a device, the next step or save() does."""
        out: dict[str, float] = self._state.update()
        if self.model.device == "cpu":  # the host buffers are the state: one pass over each
            self._check_finite(f"the update of step {self.step_count}")
        return out

    @property
    def grad_buffer(self) -> np.ndarray:
        """The flat fp32 gradient buffer itself (n_params floats, in `layout`),
        a writable view without a copy: what compute_gradients() adds to and
        apply_update() reads. CPU models only (on a device: grad_dlpack())."""
        buf: np.ndarray = self._state.grad_buffer()
        return buf

    def grad_dlpack(self) -> Any:
        """The gradient buffer as a DLPack capsule where it lives (a GPU's
        memory for a model on 'cuda:N', host memory on the CPU), without a
        copy: torch.from_dlpack(trainer.grad_dlpack()) aliases it."""
        dev = self.model.device
        return self._state.grad_dlpack(int(dev[5:]) if dev.startswith("cuda:") else 0)

    def _accumulate(self, batch: dict[str, Any]) -> dict[str, float]:
        self.zero_grad()
        return self.compute_gradients(batch)

    def step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on a batch: {loss, lm_loss, kl_loss} before the
        update (averaged over the grad_accum micro-batches), grad_norm before
        clipping, and the lr the update used (see apply_update)."""
        out = self._accumulate(batch)
        out.update(self.apply_update())
        return out

    def _check_finite(self, when: str) -> None:
        """ValueError when the weights or moments hold NaN or inf (float32 overflowed)."""
        for what, buf in (("weights", self.params), ("adam_m", self.adam_m), ("adam_v", self.adam_v)):
            with np.errstate(invalid="ignore"):  # inf - inf in the sum: NaN, which is the answer
                if np.isfinite(buf.sum(dtype=np.float64)):  # a float32 sum in float64 cannot overflow
                    continue
            bad = np.flatnonzero(~np.isfinite(buf))
            i = int(bad[0])
            where = next((n for n, s, o in self.layout if o <= i < o + int(np.prod(s))), "?")
            raise ValueError(
                f"{when} overflowed float32: {bad.size} of the trainer's {what} are not finite, the first in {where} "
                f"(lr={self.config['lr']:g}); lower lr, and resume from a checkpoint: these weights are unusable"
            )

    def gradients(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The gradient of the loss on `batch` for every trainable tensor (no
        update is made). Frozen tensors have none: they are not in the dict."""
        self._accumulate(batch)
        flat = self._state.grads()
        return {n: flat[o : o + int(np.prod(s))].reshape(s).copy() for n, s, o in self.layout}

    # ------------------------------------------------------------ training loop
    def train(
        self, batches: Iterable[dict[str, Any]], *, steps: int | None = None, log_path: str | None = None
    ) -> list[dict[str, float]]:
        """step() over `batches` (at most `steps` of them) with a progress
        bar; each step's stats are appended to log_path as one JSON line."""
        out: list[dict[str, float]] = []
        log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - closed below
        try:
            with progress_bar(total=steps, desc="training", unit="step", disable=None) as bar:
                for batch in batches:
                    if steps is not None and len(out) >= steps:
                        break
                    t0 = time.perf_counter()
                    st = self.step(batch)
                    out.append(st)
                    if log:
                        rec = {"step": self.step_count, **st, "seconds": time.perf_counter() - t0}
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{st['loss']:.4f}", lr=f"{st['lr']:.2e}")
                    bar.update(1)
        finally:
            if log:
                log.close()
        return out

    # ----------------------------------------------------------- checkpoints
    def _state_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "trainable": self.trainable,
            "lr": c["lr"],
            "weight_decay": c["weight_decay"],
            "warmup_ratio": c["warmup_ratio"],
            "total_steps": c["total_steps"],
            "grad_accum": self.grad_accum,
            "clip": c["clip"],
            "betas": [c["beta1"], c["beta2"]],
            "eps": c["eps"],
            "lm_loss_cof": c["lm_loss_cof"],
            "kl_loss_cof": c["kl_loss_cof"],
            "kl_mode": self.kl_mode,
            "e2llm": self.e2llm,
            "seed": self.seed,
            "init": self.init,  # already applied to the saved weights
            "logit_floats": c["logit_floats"],
            "layout": [[n, list(s), o] for n, s, o in self.layout],
            "n_params": int(self.params.size),
            "world_size": self.world_size,
        }

    def save(self, path: str | os.PathLike[str]) -> str:
        """Writes a checkpoint directory: the model as Model.save writes it
        (config.json + model.safetensors in the official layout with its
        tokenizer and generation config, or, for a head whose decoder stays
        frozen, config.json naming the decoder + head.safetensors), the AdamW
        moments (optimizer.safetensors) and trainer_state.json (step,
        hyper-parameters, seed: the E2-LLM and init draws derive from the seed
        and the step, so this is all the RNG state there is).

        `path` must not exist, be an empty directory, or be a checkpoint an
        earlier save() wrote (a directory holding trainer_state.json and
        nothing but checkpoint files); anything else raises FileExistsError
        naming what is in the way, and nothing is written. Weights or moments
        that are not finite (an update overflowed) raise ValueError, and
        nothing is written.

        Atomic: everything is written and fsynced in a temporary sibling
        directory, which then replaces `path` by rename. An earlier checkpoint
        at `path` is moved to `path + ".old"` for the instant between the two
        renames and deleted after; resume() falls back to it, so a crash at any
        point leaves one complete checkpoint. What a killed save leaves beside
        `path` (its temporary directory, a `.old` being deleted) is removed by
        the next save() or resume()."""
        path = os.path.abspath(os.fspath(path))
        parent, base = os.path.split(path)
        old = path + ".old"
        _check_replaceable(path)
        self._state.sync_host()  # a device's weights and moments into params / adam_m / adam_v
        self._check_finite(f"save({path!r}): an update before step {self.step_count}")
        if os.path.lexists(old) and not _only_checkpoint_files(old):
            raise FileExistsError(
                f"{old} is in the way: save() moves the previous checkpoint there while it replaces {path}, "
                f"but it is not a leftover checkpoint ({_what_is_in(old)}); move it elsewhere"
            )
        os.makedirs(parent, exist_ok=True)
        _remove_leftovers(path)
        with _locked_tmp_dir(parent, base) as tmp:
            self._state.sync_host()  # a device's weights and moments into params / adam_m / adam_v
            # frozen: as loaded; trainable: the master weights. A head's decoder stays where it is.
            head_only = bool(self.model.config.raw.get(DECODER_KEY)) and self.trainable != "all"
            write_model(self.model, tmp, head_only=head_only)
            write_safetensors(os.path.join(tmp, OPTIMIZER_FILE), {"adam_m": self.adam_m, "adam_v": self.adam_v})
            write_json(os.path.join(tmp, STATE_FILE), self._state_dict())
            fsync_path(tmp)
            if os.path.isdir(path) and os.listdir(path):  # an earlier checkpoint (an empty one is renamed over)
                if os.path.lexists(old):
                    _remove_tree(old)
                os.rename(path, old)
            os.rename(tmp, path)
            fsync_path(parent)
            if os.path.lexists(old):
                _remove_tree(old)
        return path

    @classmethod
    def resume(cls, path: str | os.PathLike[str], *, n_threads: int | None = None, device: str = "cpu") -> Trainer:
        """A Trainer (and its Model: trainer.model) continuing from a
        checkpoint written by save(): the same weights, moments, step and
        settings, so the next steps equal those of an uninterrupted run bit
        for bit (with the same n_threads). trainer_state.json and
        optimizer.safetensors are checked (keys, types, ranges; the moments'
        shape, dtype and values) and any fault raises CheckpointError naming
        the file and the key or tensor."""
        ckpt = os.path.abspath(os.fspath(path))
        st, state_path = read_checkpoint_state(ckpt)
        path = os.path.dirname(state_path)  # ckpt, or ckpt.old
        opt_path = os.path.join(path, OPTIMIZER_FILE)
        if not os.path.lexists(opt_path):
            raise CheckpointError(f"{path}: no {OPTIMIZER_FILE} (the AdamW moments) beside {STATE_FILE}")
        check_regular(opt_path, "the optimizer state", error=CheckpointError)
        _remove_leftovers(ckpt)
        model = load(path, n_threads=n_threads, device=device)
        try:
            trainer = cls(
                model,
                st["trainable"],
                lr=st["lr"],
                weight_decay=st["weight_decay"],
                warmup_ratio=st["warmup_ratio"],
                total_steps=st["total_steps"],
                grad_accum=st["grad_accum"],
                clip=st["clip"],
                lm_loss_cof=st["lm_loss_cof"],
                kl_loss_cof=st["kl_loss_cof"],
                kl_mode=st["kl_mode"],
                e2llm=st["e2llm"],
                seed=st["seed"],
                init="none",  # the saved weights already carry the initialisation
                betas=tuple(st["betas"]),
                eps=st["eps"],
                logit_floats=st.get("logit_floats", 0),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{state_path}: {exc}") from None
        trainer.init = st["init"]
        trainer.world_size = checkpoint_world_size(st, state_path)
        if [[n, list(s), o] for n, s, o in trainer.layout] != st["layout"]:
            raise CheckpointError(f"{state_path}: the checkpoint's parameter layout does not match its model")
        trainer._load_moments(opt_path)
        trainer._state.sync_device()  # the loaded moments, to a device
        trainer._state.step = st["step"]
        return trainer

    def _load_moments(self, opt_path: str) -> None:
        """adam_m and adam_v from optimizer.safetensors, checked: float32 of the layout's size,
        finite, and adam_v >= 0 (a corrupt moment would turn every weight non-finite on the
        first step)."""
        opt = SafetensorsFile(opt_path)
        unexpected = sorted(set(opt.keys()) - {"adam_m", "adam_v"})
        if unexpected:
            raise CheckpointError(f"{opt_path}: unexpected tensor {unexpected[0]} (the state holds adam_m and adam_v)")
        for name, buf in (("adam_m", self.adam_m), ("adam_v", self.adam_v)):
            if name not in opt.tensors:
                raise CheckpointError(f"{opt_path}: missing tensor {name}")
            dtype, shape = opt.tensors[name][:2]
            if dtype != "F32":
                raise CheckpointError(f"{opt_path}: tensor {name} has dtype {dtype}, expected F32 (as save writes it)")
            if tuple(shape) != buf.shape:
                raise CheckpointError(
                    f"{opt_path}: tensor {name} has shape {tuple(shape)}, expected {buf.shape} "
                    "(one value per trainable parameter)"
                )
            buf[...] = opt.get(name)
            ok = np.isfinite(buf)
            if name == "adam_v":
                ok &= buf >= 0
            if not ok.all():
                bad = np.flatnonzero(~ok)
                i = int(bad[0])
                where = next((n for n, s, o in self.layout if o <= i < o + int(np.prod(s))), "?")
                what = "non-finite or negative" if name == "adam_v" else "non-finite"
                raise CheckpointError(
                    f"{opt_path}: tensor {name} holds {bad.size} {what} value(s), the first {float(buf[i])!r} "
                    f"at index {i} (in {where}); the optimizer state is corrupt"
                )


# ------------------------------------------------------------ checkpoint files


def _read_state(state_path: str) -> dict[str, Any]:
    """trainer_state.json, read (bounded, a regular file) and checked: every key present,
    the format known, step an int in [0, INT_MAX], betas a pair. The hyper-parameters are
    checked by the Trainer they build."""
    st = read_json(state_path, what=STATE_FILE, limit=CONFIG_LIMIT, error=CheckpointError)
    if not isinstance(st, dict):
        raise CheckpointError(f"{state_path}: expected a JSON object, got {type(st).__name__}")
    for key in STATE_KEYS:
        if key not in st:
            raise CheckpointError(f"{state_path}: missing key {key!r}")
    if st["format"] != STATE_FORMAT:
        raise CheckpointError(f"{state_path}: unsupported trainer_state format {st['format']!r}")
    step = st["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= INT_MAX:
        raise CheckpointError(f"{state_path}: step must be an int in [0, {INT_MAX}], got {step!r}")
    if not (isinstance(st["betas"], list) and len(st["betas"]) == 2):
        raise CheckpointError(f"{state_path}: betas must be a list of two numbers, got {st['betas']!r}")
    if not isinstance(st["init"], str) or st["init"] not in INIT_MODES:
        raise CheckpointError(f"{state_path}: init must be one of {INIT_MODES}, got {st['init']!r}")
    if not isinstance(st["layout"], list):
        raise CheckpointError(f"{state_path}: layout must be a list, got {type(st['layout']).__name__}")
    return st


def checkpoint_world_size(st: dict[str, Any], state_path: str) -> int:
    """The world size a checkpoint's trainer_state.json records (1 when absent: written by one process)."""
    ws = st.get("world_size", 1)
    if isinstance(ws, bool) or not isinstance(ws, int) or not 1 <= ws <= 2**31 - 1:
        raise CheckpointError(f"{state_path}: world_size must be an int >= 1, got {ws!r}")
    return ws


def read_checkpoint_state(path: str) -> tuple[dict[str, Any], str]:
    """trainer_state.json of the checkpoint directory `path` (or of path.old, where a save was
    interrupted between its two renames), read and checked, and the file it came from."""
    if not os.path.lexists(os.path.join(path, STATE_FILE)) and os.path.lexists(os.path.join(path + ".old", STATE_FILE)):
        path = path + ".old"
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.lexists(state_path):
        raise FileNotFoundError(f"no trainer checkpoint ({STATE_FILE}) in {path}")
    return _read_state(state_path), state_path


def _what_is_in(path: str, limit: int = 5) -> str:
    """Words for what `path` is, or the entries of a directory that a checkpoint never holds."""
    if os.path.islink(path):
        return f"a symlink to {os.path.realpath(path)}"
    mode = os.stat(path).st_mode
    if not os.path.isdir(path):
        return "a regular file" if os.path.isfile(path) else describe(mode)
    foreign = sorted(
        e.name for e in os.scandir(path) if e.name not in CHECKPOINT_FILES or not e.is_file(follow_symlinks=False)
    )
    if not foreign:
        return f"a model's files but no {STATE_FILE}"
    more = f" and {len(foreign) - limit} more" if len(foreign) > limit else ""
    return "it holds " + ", ".join(foreign[:limit]) + more


def _only_checkpoint_files(path: str) -> bool:
    """A real directory (not a symlink) whose entries are all regular files a checkpoint holds."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    return all(e.name in CHECKPOINT_FILES and e.is_file(follow_symlinks=False) for e in os.scandir(path))


def _check_replaceable(path: str) -> None:
    """save() may write `path` when it does not exist, is an empty directory, or is a checkpoint
    (trainer_state.json and checkpoint files only); otherwise FileExistsError."""
    if not os.path.lexists(path):
        return
    if not os.path.islink(path) and os.path.isdir(path) and not os.listdir(path):
        return
    if _only_checkpoint_files(path) and os.path.isfile(os.path.join(path, STATE_FILE)):
        return
    raise FileExistsError(
        f"{path} exists and is not a Trainer checkpoint ({_what_is_in(path)}); save() replaces only an empty "
        f"directory or a checkpoint it wrote ({STATE_FILE}, {OPTIMIZER_FILE} and the model's files): "
        "choose another path"
    )


def _remove_tree(path: str) -> None:
    """shutil.rmtree that tolerates entries vanishing meanwhile (another process cleaning the
    same leftover) but raises any other failure."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        shutil.rmtree(path)


@contextlib.contextmanager
def _dir_lock(path: str) -> Iterator[bool]:
    """Tries to take an exclusive flock on directory `path` without waiting: yields True when
    it is held (or when locks are unavailable here), False when another process holds it or
    the directory is gone. A save holds the lock on its directory from creation to the end."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        yield False
        return
    try:
        got = True
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                got = False
            except OSError:  # a file system without flock: no protection, as without fcntl
                pass
        yield got
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked_tmp_dir(parent: str, base: str) -> Iterator[str]:
    """A new directory `base`.tmp-XXXXXXXX in `parent`, locked (so no concurrent save or
    resume takes it for a leftover) while the block runs and removed if the block raises."""
    for _ in range(5):
        tmp = tempfile.mkdtemp(prefix=base + ".tmp-", dir=parent)
        with _dir_lock(tmp) as got:
            if not (got and os.path.isdir(tmp)):  # taken for a leftover before the lock: make another
                continue
            try:
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return
    raise OSError(f"could not create a temporary directory for {os.path.join(parent, base)}")


def _remove_leftovers(path: str) -> None:
    """Removes what a killed save of checkpoint `path` left beside it: temporary directories
    (path.tmp-XXXXXXXX) no running save holds, and path.old once `path` holds a checkpoint.
    Only directories holding nothing but checkpoint files are touched."""
    parent, base = os.path.split(path)
    if not base or not os.path.isdir(parent):
        return
    pattern = re.compile(re.escape(base) + r"\.tmp-[a-z0-9_]{8}")
    busy = False
    for name in os.listdir(parent):
        tmp = os.path.join(parent, name)
        if not pattern.fullmatch(name) or not _only_checkpoint_files(tmp):
            continue
        with _dir_lock(tmp) as got:
            if got:
                _remove_tree(tmp)
            else:
                busy = True  # a save is running
    old = path + ".old"
    if busy or not os.path.isfile(os.path.join(path, STATE_FILE)) or not _only_checkpoint_files(old):
        return
    with _dir_lock(path) as got:  # not held: no save is between its renames or removing old
        if got:
            _remove_tree(old)
