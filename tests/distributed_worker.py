"""One rank of tests/test_distributed.py's library-level runs (started with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, as torchrun would): trains a tiny CEPE model with
cepe.distributed.DataParallel on its rows of seeded global batches and writes, to
OUT/rank<r>.json, the losses and a SHA-256 of every weight the model binds (trainable and
frozen), and to OUT/params<r>.npy the trained master weights.

    python tests/distributed_worker.py MODEL_DIR OUT STEPS GLOBAL_BATCH GRAD_ACCUM DEVICE
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

import cepe
import cepe.distributed as cd
import cepe_c

# the settings every run of the test uses, with E2-LLM positions drawn per sequence (so a rank's
# rows must get the positions of its rows of the global batch)
TRAINER = dict(
    total_steps=20,
    lr=5e-3,
    warmup_ratio=0.2,
    weight_decay=0.01,
    e2llm={"g_max": 4, "L": 16, "per_sequence": True},
    init="normal",
    seed=5,
)
T, N_CTX, L = 12, 2, 6


def global_batch(step: int, rows: int) -> dict[str, np.ndarray]:
    """The global batch of optimizer step `step` (a pure function of the step)."""
    rng = np.random.default_rng([11, step])
    return {
        "input_ids": rng.integers(3, 101, (rows, T)),
        "encoder_input_ids": rng.integers(3, 103, (rows, N_CTX, L)),
    }


def weight_digests(model: cepe.Model) -> dict[str, str]:
    return {
        name: hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()
        for name, w in cepe_c.train_weights(model._core).items()
    }


def main() -> None:
    model_dir, out, steps, rows, accum, device = sys.argv[1:7]
    ctx = cd.init(device)
    model = cepe.load(model_dir, n_threads=1, device=ctx.device)
    trainer = cepe.Trainer(model, "cross_attn+encoder", grad_accum=int(accum), **TRAINER)  # type: ignore[arg-type]
    dp = cd.DataParallel(trainer, ctx)
    losses = []
    for k in range(int(steps)):
        st = dp.step(dp.shard(global_batch(k, int(rows))), batch_rows=int(rows))
        losses.append(st["loss"])
    trainer.sync_host()
    np.save(os.path.join(out, f"params{ctx.rank}.npy"), trainer.params)
    with open(os.path.join(out, f"rank{ctx.rank}.json"), "w") as f:
        json.dump({"losses": losses, "weights": weight_digests(model), "world_size": ctx.world_size}, f)
    cd.shutdown()


if __name__ == "__main__":
    main()
