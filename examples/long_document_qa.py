"""Question answering over a document longer than the decoder's window, with a CEPE model:
the document goes through the encoder in 256-token chunks, the question through the decoder.

    python examples/long_document_qa.py --document report.txt "What did the committee decide?"
    python examples/long_document_qa.py --model path/to/cepe_head --document big.txt "Who signed it?"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cepe


def answer(model: cepe.Model, document: str, question: str, max_new_tokens: int = 64) -> str:
    """Greedy; an instruct model's chat template wraps the question."""
    reply = model.generate_text(question, context=document, max_new_tokens=max_new_tokens, temperature=0.0)
    assert isinstance(reply, str)  # not streamed
    return reply


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question")
    p.add_argument("--document", required=True, help="a text file, as long as you like")
    p.add_argument("--model", default="smollm2-135m-cepe", help="a CEPE model (default: the shipped head)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    model = cepe.load(args.model)
    document = Path(args.document).read_text(encoding="utf-8")
    n = len(model.tokenizer.encode(document))
    print(f"[{n} document tokens in the encoder; the decoder's window is {model.window}]")
    print(answer(model, document, args.question, args.max_new_tokens))


if __name__ == "__main__":
    main()
