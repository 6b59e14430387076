"""Install size and import time of cepe: what `pip install cepe` brings (the runtime dependency
closure of a pyproject.toml, sized from the installed distributions' files) and how long
`import cepe` takes in a fresh interpreter (median of N runs).

    python benchmarks/bench_install.py [--tree DIR ...] [--runs 15]

Each --tree is a checkout (its pyproject.toml, and its cepe/ with cepe_c built in place), e.g.
main against a branch; JSON to stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys

import tomllib
from packaging.requirements import Requirement


def closure(requirements: list[str]) -> dict[str, int]:
    """{distribution: bytes} of every installed distribution the requirements pull in
    (markers evaluated for this interpreter, extras of dependencies followed)."""
    seen: dict[str, int] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            seen[name] = 0
            continue
        seen[name] = sum(f.size or 0 for f in dist.files or [])
        for sub in dist.requires or []:
            for ex in req.extras or {""}:
                todo.append((Requirement(sub), ex))
    return seen


def import_times(tree: str, runs: int) -> list[float]:
    code = "import time; t = time.perf_counter(); import cepe; print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": tree}
    out = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
        out.append(float(r.stdout))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", action="append", help="a checkout to measure (default: this one)")
    p.add_argument("--runs", type=int, default=15)
    args = p.parse_args()
    trees = args.tree or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    results = {}
    for _ in range(2):  # alternate the trees: host drift hits them alike
        for tree in trees:
            t = import_times(tree, args.runs)
            results.setdefault(tree, {"import_s": []})["import_s"] += t
    for tree in trees:
        with open(os.path.join(tree, "pyproject.toml"), "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
        sizes = closure(deps)
        t = results[tree].pop("import_s")
        results[tree] = {
            "install_mb": round(sum(sizes.values()) / 1e6, 1),
            "distributions": {k: round(v / 1e6, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])},
            "import_cepe_s": {
                "median": round(statistics.median(t), 3),
                "min": round(min(t), 3),
                "max": round(max(t), 3),
                "runs": len(t),
            },
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
