"""Give a plain decoder a CEPE head and train it: an encoder (a copy of the decoder's first layers)
reads earlier text in chunks, cross-attention in the last layers learns to use it. Trains on a text
file (stage 2 windows: chunks for the encoder, the continuation for the decoder) and saves the head.

    python examples/train_head.py --text book.txt --out my_head/ --steps 200
    cepe generate --model my_head/ --context-file book.txt "Summarise chapter one."
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import cepe
from cepe.train_data import stage2_batch


def windows(ids: np.ndarray, width: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(ids) - width + 1, size=batch)
    return np.stack([ids[s : s + width] for s in starts])


def train(
    decoder: str, text: str, out: str, *, steps: int, n_ctx: int = 4, ctx_len: int = 64, decoder_len: int = 64
) -> list[float]:
    model = cepe.attach_encoder(cepe.load(decoder), encoder_layers=2)
    ids = np.asarray(model.tokenizer.encode(text, add_special_tokens=False))
    width = n_ctx * ctx_len + decoder_len
    if len(ids) < width:
        raise SystemExit(f"the text has {len(ids)} tokens; a training window needs {width}")
    trainer = cepe.Trainer(model, "cross_attn", lr=1e-3, total_steps=steps, warmup_ratio=0.1)
    rng = np.random.default_rng(0)
    losses = [trainer.step(stage2_batch(windows(ids, width, 2, rng), n_ctx, ctx_len))["loss"] for _ in range(steps)]
    model.save(out)
    return losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", default="smollm2-135m")
    p.add_argument("--text", required=True, help="training text (a few thousand tokens at least)")
    p.add_argument("--out", required=True, help="the head directory to write")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)
    losses = train(args.decoder, Path(args.text).read_text(encoding="utf-8"), args.out, steps=args.steps)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; head saved to {args.out}")


if __name__ == "__main__":
    main()
