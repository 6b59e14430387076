"""The cost of one main-thread core call: forward(cache=) of one token in a loop, on a model
small enough that the call's overhead (handing it to a worker thread, the OpenMP team) shows.

    python benchmarks/bench_call_overhead.py MODEL --tree /work/main --tree . [--threads 2]

Each --tree is a checkout with cepe_c built in place; the trees alternate, 3 rounds; JSON out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import sys, time, numpy as np
import cepe
m = cepe.load(sys.argv[1], n_threads=int(sys.argv[2]))
out = []
for rep in range(5):
    cache = m.create_cache(1, 512)
    m.forward(np.arange(1, 17)[None], cache=cache, logits="last")
    t = time.perf_counter()
    for i in range(100):
        m.forward(np.array([[5 + i % 50]]), cache=cache, logits="last")
    out.append((time.perf_counter() - t) / 100 * 1e3)
print(min(out))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tree", action="append", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ms: dict[str, list[float]] = {t: [] for t in args.tree}
    for _ in range(args.rounds):
        for tree in args.tree:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            cmd = [sys.executable, "-c", CHILD, args.model, str(args.threads)]
            r = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
            ms[tree].append(float(r.stdout))
    out = {t: {"ms_per_call_best_of_5": v, "median": round(statistics.median(v), 3)} for t, v in ms.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
