#!/usr/bin/env python
"""Memory and speed of a model held in its stored format against the same model widened to
float32 at load (cepe.load's dtype=None against dtype="float32", which was cepe's only way
before weights stayed in their format).

    python benchmarks/bench_formats.py                       # the default model, 2 threads
    python benchmarks/bench_formats.py --model m.gguf --dtypes stored float32 q8_0 bfloat16

Each run is `cepe bench --json` in a child process of its own (peak RSS is the child's
ru_maxrss: loading included), and the dtypes alternate --rounds times, so a slow spell of the
shared host does not land on one of them only. Prints one JSON object: per dtype the median and
the range of prefill and decode tokens/s and of peak RSS, and each dtype's ratios to the last
one listed (float32 by default), from the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import REPO_ROOT


def one_run(model: str, dtype: str, threads: int, prompt: int, new: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "cepe", "bench", "--json", "--model", model, "--threads", str(threads)]
    cmd += ["--dtype", dtype, "--prompt-tokens", str(prompt), "--new-tokens", str(new)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout
    r = json.loads(out)
    return {"pp": r[f"prefill_{prompt}_tok_s"], "tg": r[f"decode_{new}_tok_s"], "rss_mb": r["peak_rss_mb"]}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", nargs="+", default=["stored", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {d: [] for d in args.dtypes}
    for r in range(args.rounds):
        order = args.dtypes if r % 2 == 0 else args.dtypes[::-1]
        for dtype in order:
            runs[dtype].append(one_run(args.model, dtype, args.threads, args.prompt_tokens, args.new_tokens))
            print(f"round {r}: {dtype} {runs[dtype][-1]}", file=sys.stderr)
    result: dict[str, object] = {
        "model": args.model,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average": os.getloadavg()[0],
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }
    base = args.dtypes[-1]
    med = {d: {k: statistics.median(x[k] for x in runs[d]) for k in ("pp", "tg", "rss_mb")} for d in args.dtypes}
    for d in args.dtypes:
        result[d] = {k: summary([x[k] for x in runs[d]]) for k in ("pp", "tg", "rss_mb")}
        result[d]["vs_" + base] = {k: round(med[d][k] / med[base][k], 3) for k in ("pp", "tg", "rss_mb")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
