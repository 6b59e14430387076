"""Pilot for the SmolLM2-135M CEPE head recipe: which encoder depth, cross-attention depth and
trainable set learn most per CPU second.

Each variant attaches a head to the pulled decoder (cepe.attach_encoder, init "zero"), trains
stage-2 steps on the stdlib training split (decoder_len tokens after n_ctx x 256 encoder tokens),
and scores held-out windows (the last 256 tokens of a decoder window of 256, with and without the
1024 preceding tokens in the encoder). Prints one JSON object; the recipe's choice is recorded in
benchmarks/README.md.

    python benchmarks/pilot_cepe_head.py --steps 120 --out pilot.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import cepe
from cepe import corpus
from cepe.train_data import WindowSampler, open_tokens, stage2_batch

VARIANTS = {
    "enc2_k10_xattn+enc": {"encoder_layers": 2, "k": 10, "trainable": "cross_attn+encoder"},
    "enc2_k10_xattn": {"encoder_layers": 2, "k": 10, "trainable": "cross_attn"},
    "enc4_k15_xattn+enc": {"encoder_layers": 4, "k": 15, "trainable": "cross_attn+encoder"},
}


def heldout_windows(n_docs: int, ctx: int, W: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for doc in corpus.heldout_tokens()[:n_docs]:
        end = len(doc)
        out.append((doc[end - W : end].astype(np.int64), doc[end - W - ctx : end - W].astype(np.int64)))
    return out


def score(model, windows) -> dict[str, float]:
    nll0, nll1 = [], []
    for ids, ctx in windows:
        nll0.append(np.log(model.perplexity(ids)))
        nll1.append(np.log(model.perplexity(ids, encoder_input_ids=ctx.reshape(-1, 256))))
    return {"ppl_no_context": float(np.exp(np.mean(nll0))), "ppl_1k_context": float(np.exp(np.mean(nll1)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train", default="/tmp/stdlib/train.npy")
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dec = cepe.load("smollm2-135m", n_threads=2)
    windows = heldout_windows(args.docs, 1024)
    tf = open_tokens(args.train, "packed")
    n_ctx, dlen = 4, 256
    sampler = WindowSampler([tf], n_ctx * 256 + dlen, n_ctx * 256 + dlen, seed=0)
    results = {}
    for name in args.variants.split(","):
        v = VARIANTS[name]
        model = cepe.attach_encoder(dec, encoder_layers=v["encoder_layers"], num_cross_attn_layers=v["k"])
        tr = cepe.Trainer(model, v["trainable"], lr=args.lr, warmup_ratio=0.04, total_steps=args.steps)
        losses, t0 = [], time.perf_counter()
        for step in range(args.steps):
            w = sampler.windows(sampler.batch_indices(step, args.batch))
            losses.append(tr.step(stage2_batch(w, n_ctx, 256))["loss"])
        secs = time.perf_counter() - t0
        results[name] = {
            **v,
            "seconds_per_step": secs / args.steps,
            "loss_first10": float(np.mean(losses[:10])),
            "loss_last10": float(np.mean(losses[-10:])),
            **score(model, windows),
        }
        print(json.dumps({name: results[name]}), flush=True)
    out = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "results": results}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
