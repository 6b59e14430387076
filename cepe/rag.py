"""Open-domain QA the way the CEPE paper evaluates it (spec §7.3): retrieve
passages, put the top ones in the decoder's prompt and the next ones in the
encoder (one passage per chunk), answer greedily and stop at a newline."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .retrieval import BM25Retriever, Passage, as_passages
from .text import check_text


@dataclass
class Answer:
    text: str
    in_decoder: list[Passage] = field(default_factory=list)
    in_encoder: list[Passage] = field(default_factory=list)
    prompt: str = ""
    demos_in_encoder: bool = False


def document_block(p: Passage) -> str:
    return f"Document (Title: {p.title}): {p.text}" if p.title else f"Document: {p.text}"


def demonstrations(demos: Sequence[tuple[str, str]]) -> list[str]:
    return [f"Question: {q}\nAnswer: {a}" for q, a in demos]


def build_prompt(question: str, passages: Sequence[Passage], demos: Sequence[tuple[str, str]] = ()) -> str:
    """The paper's QA prompt: document blocks, demonstrations, then the question."""
    parts = [document_block(p) for p in passages] + demonstrations(demos)
    parts.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(parts)


def answer(
    question: str,
    corpus_or_retriever: Sequence[str] | Any,
    k: int | None = None,
    in_decoder: int = 10,
    in_encoder: int | None = None,
    *,
    model: Any,
    demos: Sequence[tuple[str, str]] = (),
    max_new_tokens: int = 25,
) -> Answer:
    """Retrieves k passages (default in_decoder + in_encoder) for the question
    from a list of passages (BM25) or any retriever callable (query, k) ->
    passages; the top in_decoder are written into the prompt, the next
    in_encoder (default: 10 for a CEPE model, 0 for any other) are encoded as
    one CEPE chunk each. Where the encoder is used, the demonstrations are
    packed into one more encoder chunk instead of the prompt (question and
    answer only), as the paper's CEPE evaluation does. A k larger than a passage list is clamped to its
    size, with a warning. Greedy decoding, at most max_new_tokens, stopping at
    a newline."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    check_text(question, "question")
    is_cepe = bool(getattr(model.config, "is_cepe", False))
    if in_encoder is None:
        in_encoder = 10 if is_cepe else 0
    for name, v in (("in_decoder", in_decoder), ("in_encoder", in_encoder)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if in_encoder and not is_cepe:
        raise ValueError("in_encoder > 0 needs a CEPE model (with cross-attention); use in_encoder=0 otherwise")
    if k is None and in_decoder + in_encoder == 0:
        raise ValueError("in_decoder and in_encoder are both 0: no passages to use (give one of them >= 1)")
    k = in_decoder + in_encoder if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if callable(corpus_or_retriever):
        retriever = corpus_or_retriever
    else:
        retriever = BM25Retriever(corpus_or_retriever)
        if k > len(retriever.passages):
            warnings.warn(
                f"{k} passages asked for, but the corpus has {len(retriever.passages)}: using them all",
                stacklevel=2,
            )
            k = len(retriever.passages)
    found = as_passages(retriever(question, k))
    top, rest = found[:in_decoder], found[in_decoder : in_decoder + in_encoder]
    contexts = [p.text for p in rest]
    demos_in_encoder = bool(demos) and in_encoder > 0
    if demos_in_encoder:
        contexts.append("\n\n".join(demonstrations(demos)))
    prompt = build_prompt(question, top, () if demos_in_encoder else demos)
    text = model.generate_text(  # greedy, on the raw prompt: the paper's QA protocol
        prompt,
        contexts=contexts or None,
        max_new_tokens=max_new_tokens,
        stop=["\n"],
        chat=False,
        temperature=0.0,
        repeat_penalty=1.0,
    )
    return Answer(text.strip(), top, rest, prompt, demos_in_encoder)
