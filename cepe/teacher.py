"""CEPED teacher tables (spec CEPE.md §6.4, the reference's data/calculate_logits.py).

`cepe teacher --config cfg.json --teacher DIR` runs a teacher decoder with full attention over every
training window of a `cepe train` config and stores, for the last T_kl positions of each window,
the teacher's next-token distribution in the form that the KL term reads (`distill_prob` /
`distill_index`, see cepe.train_run):

- distill_prob (n_windows, T_kl, K + 1) float16: the top-K probabilities in descending order,
  then one last bucket that holds the rest of the mass (the sum of all other probabilities);
- distill_index (n_windows, T_kl, K) int32: the ids of those K tokens.

Rows are in window-number order (cepe.train_data.WindowSampler: file, sequence, start), so
a training batch picks its rows by window id. Row r of a window belongs to window position
W - T_kl + r. That is decoder position decoder_len - T_kl + r, where the student's KL term
reads it (csrc/train/backward.c). The teacher reads the whole window: in stage 2, the
n_ctx * ctx_len tokens that the student's encoder gets, followed by the decoder_len continuation;
in warmup, the decoder_len tokens. So teacher and student see the same text (§6.4).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import numpy as np

from .config import read_config
from .errors import ConfigError
from .load import load
from .model import Model
from .progress import bar as progress_bar
from .train_run import TrainConfig, open_data
from .work_shards import shard_path, shard_range

SLICE = 128  # scored positions per teacher call (bounds the logits held at once)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def top_k_table(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, V) float32 logits -> the softmax's top-k probabilities (n, k) float64 in descending
    order, their ids (n, k) int64 and the remaining mass (n,) float64 (the sum of the other
    probabilities, >= 0). Computed in float64. Ties go to the lower id (the same order as a
    stable argsort of -p)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    n, V = p.shape
    if k < V:
        idx = np.argpartition(-p, k - 1, axis=-1)[:, :k]
        # argpartition picks any of the tokens tied at the k-th place; redo those (rare) rows with
        # a stable sort so the lowest ids win, as in np.argsort(-p, kind="stable")
        kth = np.take_along_axis(p, idx, axis=-1).min(axis=-1, keepdims=True)
        tied = np.flatnonzero((p >= kth).sum(axis=-1) > k)
        if tied.size:
            idx[tied] = np.argsort(-p[tied], axis=-1, kind="stable")[:, :k]
    else:
        idx = np.broadcast_to(np.arange(V), (n, V)).copy()
    top = np.take_along_axis(p, idx, axis=-1)
    order = np.lexsort((idx, -top), axis=-1)  # by probability, descending; then by id
    idx = np.take_along_axis(idx, order, axis=-1)
    top = np.take_along_axis(top, order, axis=-1)
    rest = p.copy()
    np.put_along_axis(rest, idx, 0.0, axis=-1)
    return top, idx, np.maximum(rest.sum(axis=-1), 0.0)


def _student_vocab(cfg: TrainConfig) -> tuple[int, int]:
    """The student's decoder and encoder vocabulary sizes (from its config.json; no weights read)."""
    if not os.path.isdir(cfg.model):
        raise ConfigError(f"{cfg.source}: model: no such model directory: {cfg.model}")
    try:
        mcfg = read_config(cfg.model)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{cfg.source}: model: {exc}") from None
    if not mcfg.is_cepe or mcfg.encoder is None:
        raise ConfigError(
            f"{cfg.source}: model: {cfg.model} is not a CEPE checkpoint (no cross-attention / encoder_config)"
        )
    return mcfg.vocab_size, mcfg.encoder.vocab_size


def default_paths(cfg: TrainConfig) -> tuple[str, str]:
    """The config's distill_prob / distill_index, else <output_dir>/distill_{prob,index}.npy."""
    if cfg.distill_prob is not None and cfg.distill_index is not None:
        return cfg.distill_prob, cfg.distill_index
    return os.path.join(cfg.output_dir, "distill_prob.npy"), os.path.join(cfg.output_dir, "distill_index.npy")


def teacher_tables(
    teacher: Model | str | os.PathLike[str],
    cfg: TrainConfig,
    *,
    top_k: int = 50,
    t_kl: int | None = None,
    out_prob: str | os.PathLike[str] | None = None,
    out_index: str | os.PathLike[str] | None = None,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Writes the CEPED teacher tables of `cfg`'s training windows (see the module docstring).

    teacher: a loaded cepe.Model (a plain decoder, or a CEPE model used as its base decoder), or a
        path for cepe.load (with cfg.threads and cfg.device).
    cfg: the `cepe train` config (cepe.train_run.load_config). Its data, window shape, stride and
        seed define the windows; its student model (cfg.model) must have the teacher's vocabulary.
    top_k: K, the probabilities kept per position, in [1, vocab_size).
    t_kl: the positions per window, the last ones of the decoder (default decoder_len),
        in [1, decoder_len].
    out_prob, out_index: the .npy files (default: see default_paths). They are written to
        temporary files next to them and renamed into place when complete.
    shard: (i, n): only shard i of n of the windows (cepe.work_shards), into
        <out_prob>-0000i-of-0000n.npy and the same for out_index; merge_shards joins the n.

    Returns {n_windows, T_kl, K, distill_prob, distill_index, prob_shape, index_shape,
    mean_rest_mass, seconds}.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a cepe.train_run.TrainConfig, got {type(cfg).__name__}")
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if t_kl is None:
        t_kl = cfg.decoder_len
    if not _is_int(t_kl):
        raise TypeError(f"t_kl must be an int, got {type(t_kl).__name__}")
    top_k, t_kl = int(top_k), int(t_kl)
    if not 1 <= t_kl <= cfg.decoder_len:
        raise ValueError(
            f"t_kl must be in [1, decoder_len = {cfg.decoder_len}] (the table rows cover the last t_kl "
            f"decoder positions), got {t_kl}"
        )
    default_prob, default_index = default_paths(cfg)
    prob_path = os.path.abspath(os.fspath(out_prob if out_prob is not None else default_prob))
    index_path = os.path.abspath(os.fspath(out_index if out_index is not None else default_index))
    if prob_path == index_path:
        raise ValueError(f"out_prob and out_index must be two different files, both are {prob_path}")

    vocab, enc_vocab = _student_vocab(cfg)
    if not isinstance(teacher, Model):
        teacher = load(teacher, n_threads=cfg.threads, device=cfg.device)
    tv = teacher.config.vocab_size
    if tv != vocab:
        raise ValueError(
            f"teacher: its vocabulary has {tv} tokens, the student's ({cfg.model}) has {vocab}; "
            "the KL term compares the two distributions token by token, so they must be equal"
        )
    if not 1 <= top_k < tv:
        raise ValueError(f"top_k must be in [1, vocab_size = {tv}) (one bucket holds the rest), got {top_k}")

    # the data as `cepe train` reads it (the tables themselves are what we are making: not opened)
    data = open_data(dataclasses.replace(cfg, distill_prob=None, distill_index=None), vocab, enc_vocab)
    sampler = data.sampler
    W = cfg.window
    first_w, end_w = shard_range(len(sampler), *shard) if shard is not None else (0, len(sampler))
    if shard is not None:
        prob_path, index_path = shard_path(prob_path, *shard), shard_path(index_path, *shard)
    n = end_w - first_w
    if W > teacher.config.max_position_embeddings:
        warnings.warn(
            f"teacher: a window holds {W} tokens, beyond the teacher's max_position_embeddings "
            f"({teacher.config.max_position_embeddings}); the reference's teacher reads its native window",
            stacklevel=2,
        )

    tmp = {}
    for path in (prob_path, index_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp[path] = f"{path}.tmp{os.getpid()}"
    prob = index = None
    t0 = time.perf_counter()
    rest_sum = 0.0
    try:
        prob = np.lib.format.open_memmap(tmp[prob_path], mode="w+", dtype=np.float16, shape=(n, t_kl, top_k + 1))
        index = np.lib.format.open_memmap(tmp[index_path], mode="w+", dtype=np.int32, shape=(n, t_kl, top_k))
        cache = teacher.create_cache(1, W)
        first = W - t_kl  # the window position of table row 0
        with progress_bar(total=n, desc="cepe teacher", unit="window", disable=None if progress else True) as bar:
            for i in range(n):
                ids = sampler.window_tokens(first_w + i)
                cache.reset()
                if first > 0:
                    teacher.forward(ids[None, :first], cache=cache, logits="last")
                for lo in range(first, W, SLICE):
                    hi = min(lo + SLICE, W)
                    logits = teacher.forward(ids[None, lo:hi], cache=cache, logits="all")[0]
                    top, idx, rest = top_k_table(logits, top_k)
                    r0, r1 = lo - first, hi - first
                    prob[i, r0:r1, :top_k] = top
                    prob[i, r0:r1, top_k] = rest
                    index[i, r0:r1] = idx
                    rest_sum += float(rest.sum())
                bar.update(1)
        prob.flush()
        index.flush()
        prob = index = None  # closes the memmaps
        os.replace(tmp[prob_path], prob_path)
        os.replace(tmp[index_path], index_path)
    finally:
        prob = index = None  # close the memmaps before removing what is left of a failed run
        for t in tmp.values():
            if os.path.exists(t):
                os.remove(t)
    return {
        "n_windows": n,
        "windows": [first_w, end_w],
        "T_kl": t_kl,
        "K": top_k,
        "distill_prob": prob_path,
        "distill_index": index_path,
        "prob_shape": [n, t_kl, top_k + 1],
        "index_shape": [n, t_kl, top_k],
        "mean_rest_mass": rest_sum / max(n * t_kl, 1),
        "seconds": time.perf_counter() - t0,
    }


def merge_shards(
    cfg: TrainConfig,
    n_shards: int,
    *,
    out_prob: str | os.PathLike[str] | None = None,
    out_index: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Joins the n_shards tables that teacher_tables(..., shard=(i, n_shards)) wrote (paths as
    there) into out_prob / out_index, in shard order: the tables an unsharded run writes. The
    shards must all be present, agree on T_kl and K, and together hold one row per window."""
    if not _is_int(n_shards) or n_shards < 1:
        raise ValueError(f"n_shards must be an int >= 1, got {n_shards!r}")
    default_prob, default_index = default_paths(cfg)
    vocab, enc_vocab = _student_vocab(cfg)
    n_windows = len(
        open_data(dataclasses.replace(cfg, distill_prob=None, distill_index=None), vocab, enc_vocab).sampler
    )
    out: dict[str, Any] = {"n_windows": n_windows, "shards": n_shards}
    for key, path, default, last in (
        ("distill_prob", out_prob, default_prob, 1),
        ("distill_index", out_index, default_index, 0),
    ):
        final = os.path.abspath(os.fspath(path if path is not None else default))
        parts: list[np.ndarray] = []
        for i in range(n_shards):
            p = shard_path(final, i, n_shards)
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{key}: shard {i} of {n_shards} is missing: {p}")
            a = np.load(p, mmap_mode="r", allow_pickle=False)
            lo, hi = shard_range(n_windows, i, n_shards)
            if a.ndim != 3 or a.shape[0] != hi - lo or (parts and a.shape[1:] != parts[0].shape[1:]):
                raise ValueError(
                    f"{key}: {p} has shape {a.shape}; shard {i} of {n_shards} holds windows [{lo}, {hi}) "
                    f"({hi - lo} rows) of the same T_kl and K as shard 0"
                )
            parts.append(a)
        tmp = f"{final}.tmp{os.getpid()}"
        try:
            merged = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=parts[0].dtype, shape=(n_windows, *parts[0].shape[1:])
            )
            row = 0
            for a in parts:
                merged[row : row + a.shape[0]] = a
                row += a.shape[0]
            merged.flush()
            del merged
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        out[key] = final
        out["T_kl"], out["K"] = parts[0].shape[1], parts[0].shape[2] - last
    return out
