"""Data-parallel training on torch.distributed (the `distributed` extra: pip install "cepe[distributed]").

Every process (rank) holds the whole model and trains on its own rows of each global batch; the
gradients are averaged with one all-reduce per optimizer step, so every rank applies the same
update and the weights stay identical everywhere. torch.distributed is the engine: gloo between
CPU processes, NCCL between GPUs, launched by torchrun on one node or many:

    torchrun --nproc-per-node 8 -m cepe train --config stage2.toml     # or: cepe train --nproc 8 ...

    dp = cepe.distributed.DataParallel(trainer)   # after cepe.distributed.init()
    stats = dp.step(my_rows, batch_rows=global_batch_size)

The gradient buffer is the Trainer's own flat fp32 buffer, wrapped without a copy
(torch.from_numpy on the CPU, DLPack for a model on a GPU) and summed in place.

Reduction order. Each rank forms the gradient of its rows' mean loss (its grad_accum
micro-batches added in order, each weighted 1 / grad_accum) times 1 / world_size, then the
buffers are summed by the backend's all-reduce (gloo's ring on CPUs, NCCL's ring or tree on
GPUs). Every element is reduced once and the result copied to all ranks, so all ranks hold the
same bits; against one process with the whole batch only the order of the additions differs
(rounding: about 1e-7 relative). The reported losses are the ranks' means, averaged.

A rank that dies or stops answering makes the others fail, not hang: collectives run under the
process group's timeout (init's timeout_s, or CEPE_DIST_TIMEOUT seconds), and the error names the
rank(s) that did not reach the exchange or did not report its failure.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .train import Trainer

DEFAULT_TIMEOUT_S = 600.0
_GRACE_S = 3.0  # how long the survivors of a failed exchange wait for each other's reports
_PREFIX = "cepe/"  # keys in the process group's store


class DistributedError(RuntimeError):
    """A collective failed: a rank died, stopped answering, or the ranks disagree."""


def _torch() -> Any:
    try:
        import torch
        import torch.distributed
    except ImportError:
        raise ImportError('data-parallel training needs torch: pip install "cepe[distributed]"') from None
    if not torch.distributed.is_available():
        raise ImportError("this torch build has no torch.distributed")
    return torch


def launched() -> bool:
    """Whether torchrun (or a launcher setting the same variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_device(device: str) -> str:
    """The device this rank trains on: "cpu", or GPU LOCAL_RANK for "cuda"."""
    return f"cuda:{_env_int('LOCAL_RANK', 0, 0)}" if device == "cuda" else device


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    return _env_int("WORLD_SIZE", 1, 1)


def _env_int(name: str, default: int, lo: int) -> int:
    v = os.environ.get(name)
    if v is None:
        return default
    try:
        n = int(v)
    except ValueError:
        n = lo - 1
    if n < lo:
        raise ValueError(f"the environment variable {name} must be an integer >= {lo}, got {v!r}")
    return n


@dataclass(frozen=True)
class Context:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" | "nccl"
    device: str  # the device this rank trains on: "cpu" or "cuda:<local_rank>"
    timeout_s: float


def init(device: str = "cpu", *, timeout_s: float | None = None) -> Context:
    """Joins the process group that torchrun (or RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in
    the environment) describes: gloo for device "cpu", NCCL for "cuda" (each rank on GPU
    LOCAL_RANK). A group this process already joined is reused. timeout_s bounds every
    collective (default: CEPE_DIST_TIMEOUT, else 600 s)."""
    torch = _torch()
    dist = torch.distributed
    if timeout_s is None:
        raw = os.environ.get("CEPE_DIST_TIMEOUT")
        try:
            timeout_s = float(raw) if raw is not None else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"CEPE_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not (timeout_s > 0 and np.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (each rank takes GPU LOCAL_RANK), got {device!r}")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ and not dist.is_initialized():
            raise DistributedError(f"{name} is not set: start data-parallel runs with torchrun (or cepe train --nproc)")
    local_rank = _env_int("LOCAL_RANK", 0, 0)
    backend = "gloo" if device == "cpu" else "nccl"
    rank_device = "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device 'cuda': torch sees no GPU on this node")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local_rank)
        rank_device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    elif dist.get_backend() != backend:
        raise DistributedError(f"the process group uses {dist.get_backend()}, device {device!r} needs {backend}")
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, backend, rank_device, timeout_s)


def shutdown() -> None:
    """Leaves the process group (if joined)."""
    dist = _torch().distributed
    if dist.is_initialized():
        dist.destroy_process_group()


def _store() -> Any:
    """The process group's key-value store (torchrun's agent, or rank 0's TCPStore), or None."""
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - another torch
        return None


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


class DataParallel:
    """Data-parallel steps of a Trainer over the default process group (see the module docstring).

    The Trainer must be the same on every rank (same model, settings, weights and step: checked
    here); a Trainer resumed from a checkpoint must have been saved by a run of the same world
    size (the micro-batches and the reduction order would differ otherwise)."""

    def __init__(self, trainer: Trainer, ctx: Context | None = None) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a cepe.Trainer, got {type(trainer).__name__}")
        self._torch = torch = _torch()
        self._dist = dist = torch.distributed
        if not dist.is_initialized():
            raise DistributedError("no process group: call cepe.distributed.init() first")
        self.trainer = trainer
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.timeout_s = ctx.timeout_s if ctx is not None else DEFAULT_TIMEOUT_S
        self._seq = 0  # collectives entered (the same count on every rank)
        self._kv = _store()
        if trainer.step_count > 0 and trainer.world_size != self.world_size:
            raise DistributedError(
                f"this trainer was saved by a run of world size {trainer.world_size} at step {trainer.step_count}, "
                f"and this run has {self.world_size}: resume with {trainer.world_size} processes (another world size "
                "changes the micro-batches and the reduction order, so the run would not continue exactly)"
            )
        trainer.world_size = self.world_size
        self._cuda = trainer.model.device != "cpu"
        if self._cuda:
            self._grads = torch.from_dlpack(trainer.grad_dlpack())
        else:
            self._grads = torch.from_numpy(trainer.grad_buffer)
        self.allreduce_seconds = 0.0  # time in the gradient all-reduce of the last step
        trainer.sync_host()
        self._check_same(
            "the trainer's state (weights, AdamW moments, step)",
            _digest(trainer.params, trainer.adam_m, trainer.adam_v, np.array([trainer.step_count])),
        )

    # ------------------------------------------------------------ failures
    def _mark(self, key: str) -> None:
        if self._kv is not None:
            self._kv.set(f"{_PREFIX}{key}/{self.rank}", str(self._seq))

    def _peers_state(self, key: str) -> dict[int, int | None]:
        """Each other rank's last recorded collective under `key` (None: none recorded)."""
        out: dict[int, int | None] = {}
        for r in range(self.world_size):
            if r == self.rank:
                continue
            k = f"{_PREFIX}{key}/{r}"
            out[r] = int(self._kv.get(k)) if self._kv.check([k]) else None
        return out

    def _blame(self) -> str:
        """Words naming the rank(s) behind a failed collective, from the store's records."""
        if self._kv is None:
            return "a peer process stopped or did not answer"
        try:
            at = self._peers_state("at")
            late = sorted(r for r, s in at.items() if s is None or s < self._seq)
            if late:
                return f"rank(s) {', '.join(map(str, late))} did not reach it (stopped or stuck before it)"
            # every peer entered it: the live ones report the failure too; the silent ones are gone
            self._kv.set(f"{_PREFIX}failed/{self._seq}/{self.rank}", "1")
            deadline = time.monotonic() + _GRACE_S
            silent = list(at)
            while silent and time.monotonic() < deadline:
                silent = [r for r in silent if not self._kv.check([f"{_PREFIX}failed/{self._seq}/{r}"])]
                time.sleep(0.05)
            if silent:
                return f"rank(s) {', '.join(map(str, silent))} stopped during it (no report within {_GRACE_S} s)"
            return "every rank reached it and reported the failure"
        except (RuntimeError, ValueError, OSError):
            where = "torchrun's agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0"
            return f"the process group's store (held by {where}) is unreachable too: {where} stopped"

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        """Runs one collective, turning a failure into a DistributedError naming the rank(s)."""
        self._seq += 1
        try:
            self._mark("at")
            return fn()
        except DistributedError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:  # gloo / NCCL / store errors
            detail = " ".join(str(exc).split())[:300]
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed: {self._blame()} ({detail})"
            ) from None

    def _check_same(self, what: str, digest: str) -> None:
        """Every rank must hold the same `what` (its digest compared through the store)."""
        if self._kv is None:
            return
        key = f"{_PREFIX}digest/{self._seq}"
        self._collective(f"comparing {what}", lambda: self._kv.set(f"{key}/{self.rank}", digest))
        self.barrier(f"comparing {what}")
        differ = [r for r in range(self.world_size) if self._kv.get(f"{key}/{r}").decode() != digest]
        if differ:
            raise DistributedError(
                f"rank {self.rank}: {what} differs on rank(s) {', '.join(map(str, differ))}: every rank must "
                "start from the same model, settings and checkpoint"
            )

    # ---------------------------------------------------------------- steps
    def rows(self, batch_rows: int) -> tuple[int, int]:
        """(first, count): this rank's rows of a global batch of batch_rows rows (contiguous
        blocks in rank order, so they are a pure function of the step, the rank and the world size)."""
        if batch_rows % self.world_size:
            raise ValueError(f"a batch of {batch_rows} rows does not split over {self.world_size} processes")
        n = batch_rows // self.world_size
        return self.rank * n, n

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's rows of a global batch (every array's first axis)."""
        first, n = self.rows(len(batch["input_ids"]))
        return {k: None if v is None else np.asarray(v)[first : first + n] for k, v in batch.items()}

    def step(self, batch: dict[str, Any], *, batch_rows: int | None = None) -> dict[str, float]:
        """One optimizer step: the gradients of this rank's `batch` (its rows(batch_rows) of the
        global batch; default: world_size times its rows), averaged over the ranks, then the
        update. Returns the Trainer.step statistics, the losses averaged over the ranks."""
        t, torch = self.trainer, self._torch
        n = len(batch["input_ids"])
        total = batch_rows if batch_rows is not None else n * self.world_size
        first, count = self.rows(total)
        if count != n:
            raise ValueError(f"this rank's batch has {n} rows; its share of {total} is {count}")
        k = t.step_count + 1
        t.zero_grad()
        losses = t.compute_gradients(batch, scale=1.0 / self.world_size, rows=(first, total))
        t0 = time.perf_counter()
        self._collective(
            f"the gradient all-reduce of step {k}",
            lambda: self._dist.all_reduce(self._grads, op=self._dist.ReduceOp.SUM),
        )
        if self._cuda:  # NCCL ran on torch's stream; the update runs on cepe's
            torch.cuda.current_stream(self._grads.device).synchronize()
        self.allreduce_seconds = time.perf_counter() - t0
        keys = ("loss", "lm_loss", "kl_loss")
        dev = self._grads.device if self._cuda else "cpu"
        mean = torch.tensor([losses[key] for key in keys], dtype=torch.float64, device=dev)
        self._collective(f"the loss all-reduce of step {k}", lambda: self._dist.all_reduce(mean))
        out = {key: float(v) / self.world_size for key, v in zip(keys, mean.tolist(), strict=True)}
        out.update(t.apply_update())
        return out

    def barrier(self, what: str = "a barrier") -> None:
        """Waits for every rank (under the process group's timeout)."""
        self._collective(what, lambda: self._dist.barrier())
