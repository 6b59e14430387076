#!/usr/bin/env python
"""A/B of two built cepe trees on one model: prefill of 512 tokens (last logits) and greedy decode of
64 tokens, each tree in its own child process, the order flipped every pair (best of 3 prefills and
of 2 decodes per child). Prints the medians and the after/before ratios of the pairs.

    python benchmarks/ab_builds.py BEFORE_TREE AFTER_TREE MODEL PAIRS [THREADS]

THREADS (default 2) sets n_threads and OMP_NUM_THREADS. Besides wall-clock seconds, the decode's
process CPU seconds are reported (tg_cpu): on a host shared with other jobs, a thread that waits
for a core adds wall time but no CPU time, so with THREADS=1 (nothing spins at a barrier) tg_cpu
compares the builds' work per token where the wall clock cannot (memory-bandwidth contention from
the other jobs still counts)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import cepe
m = cepe.load(sys.argv[2], n_threads=int(sys.argv[3]))
ids = np.random.default_rng(0).integers(3, 1000, size=(1, 512))
m.forward(ids, logits="last")
pp = []
for _ in range(3):
    t = time.perf_counter(); m.forward(ids, logits="last"); pp.append(time.perf_counter() - t)
tg, tg_cpu = [], []
for _ in range(2):
    t, c = time.perf_counter(), time.process_time()
    m.generate(ids[:, :16], 64, eos_token_id=[])
    tg.append(time.perf_counter() - t); tg_cpu.append(time.process_time() - c)
print(json.dumps({"pp": min(pp), "tg": min(tg), "tg_cpu": min(tg_cpu)}))
"""


def main() -> None:
    before, after, model, pairs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    threads = sys.argv[5] if len(sys.argv) > 5 else "2"
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    res: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(pairs):
        order = [("before", before), ("after", after)]
        if i % 2:
            order.reverse()
        for name, tree in order:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tree, model, threads], capture_output=True, text=True, cwd="/tmp", env=env
            )
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for k in ("pp", "tg", "tg_cpu"):
        b = [r[k] for r in res["before"]]
        a = [r[k] for r in res["after"]]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(
            f"{k}: before median {statistics.median(b):.3f} s, after median {statistics.median(a):.3f} s, "
            f"after/before median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
