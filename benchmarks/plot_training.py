"""The loss curve of a `cepe train` recipe run: every stage's metrics.jsonl, one after the other.

    python benchmarks/plot_training.py runs/smollm2-135m-cepe --out benchmarks/cepe_head_training.png

Prints a JSON summary per stage (steps, first/last-50 mean loss, seconds per step, wall time).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from _common import pyplot


def read_stages(run_dir: str) -> list[tuple[str, list[dict]]]:
    """(stage name, records) in the order the recipe ran them (recipe.json's stages, else by mtime)."""
    names = []
    recipe = os.path.join(run_dir, "recipe.json")
    if os.path.isfile(recipe):
        with open(recipe) as f:
            names = [s.get("name", s.get("stage")) for s in json.load(f)["stages"]]
    else:
        names = sorted(
            (d for d in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, d, "metrics.jsonl"))),
            key=lambda d: os.path.getmtime(os.path.join(run_dir, d, "metrics.jsonl")),
        )
    out = []
    for name in names:
        path = os.path.join(run_dir, name, "metrics.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                out.append((name, [json.loads(line) for line in f if line.strip()]))
    return out


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    if len(x) < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default="benchmarks/cepe_head_training.png")
    ap.add_argument("--smooth", type=int, default=25, help="moving-average width (steps)")
    args = ap.parse_args()
    stages = read_stages(args.run_dir)
    summary = []
    for name, recs in stages:
        loss = np.array([r["loss"] for r in recs])
        secs = np.array([r["seconds"] for r in recs])
        summary.append(
            {
                "stage": name,
                "steps": len(recs),
                "loss_first50": float(loss[:50].mean()) if len(loss) else None,
                "loss_last50": float(loss[-50:].mean()) if len(loss) else None,
                "seconds_per_step_median": float(np.median(secs)) if len(secs) else None,
                "wall_s": float(secs.sum()),
            }
        )
    print(json.dumps(summary, indent=1))
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for name, recs in stages:
        steps = offset + np.array([r["step"] for r in recs])
        loss = np.array([r["loss"] for r in recs])
        ax.plot(steps, loss, alpha=0.25, lw=0.8)
        s = smooth(loss, args.smooth)
        ax.plot(steps[len(steps) - len(s) :], s, lw=2, label=f"{name} ({len(recs)} steps, mean of {args.smooth})")
        offset = int(steps[-1]) if len(steps) else offset
        ax.axvline(offset, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("optimizer step (stages in sequence)")
    ax.set_ylabel("training loss (next-token cross-entropy)")
    ax.set_title(f"cepe train: {os.path.basename(os.path.abspath(args.run_dir))}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
