"""Retrieval-augmented answers over a folder of .txt files: BM25 picks passages, the best ones go
into the prompt and, with a CEPE model, the next ones into its encoder (the CEPE paper's QA setup).

    python examples/rag_folder.py notes/ "When is the next release?"
    python examples/rag_folder.py --model smollm2-135m-cepe --in-encoder 10 wiki/ "Who founded Rome?"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cepe
from cepe.rag import Answer, answer
from cepe.retrieval import split_passages


def read_folder(folder: str | Path) -> list[str]:
    """Every .txt file under folder, split into passages of at most 100 words."""
    docs = [p.read_text(encoding="utf-8") for p in sorted(Path(folder).rglob("*.txt"))]
    if not docs:
        raise SystemExit(f"no .txt files under {folder}")
    return split_passages(docs, words=100)


def ask(model: cepe.Model, folder: str | Path, question: str, in_decoder: int, in_encoder: int | None) -> Answer:
    return answer(question, read_folder(folder), in_decoder=in_decoder, in_encoder=in_encoder, model=model)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("question")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--in-decoder", type=int, default=3, help="passages in the prompt")
    p.add_argument("--in-encoder", type=int, default=None, help="passages in a CEPE encoder (default: 10 / 0)")
    args = p.parse_args(argv)
    out = ask(cepe.load(args.model), args.folder, args.question, args.in_decoder, args.in_encoder)
    for passage in out.in_decoder:
        print(f"[prompt, score {passage.score:.2f}] {passage.text[:80]}")
    for passage in out.in_encoder:
        print(f"[encoder, score {passage.score:.2f}] {passage.text[:80]}")
    print(out.text)


if __name__ == "__main__":
    main()
