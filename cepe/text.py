"""Text in, text out: the tokenizer-facing half of cepe.Model (generate_text,
perplexity_text), kept apart from the array API in model.py.

Spec §9.6: decoder prompts get BOS; encoder chunks are encoded without BOS,
padded with EOS and masked; a long context is cut into chunks from its end
(left truncation when it exceeds the budget), passages one per chunk."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .chunking import DEFAULT_CHUNK_LEN, chunk_long_context, chunk_passages


def check_text(value: Any, name: str) -> str:
    """value if it is a str that encodes to UTF-8; TypeError / ValueError naming
    it otherwise (bytes, or a str with lone surrogates, as undecodable bytes on
    a command line become)."""
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} (decode it first)")
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} is not valid UTF-8 text: it holds {value[exc.start]!r} at character {exc.start} "
            "(a lone surrogate, as undecodable bytes become)"
        ) from None
    return value


def require_tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            f"{model.path} has no tokenizer (tokenizer.json or GGUF metadata): use the token-id API "
            "(forward/generate) instead"
        )
    return tok


def pad_id(tok: Any) -> int:
    for v in (tok.eos_token_id, tok.pad_token_id):  # the spec pads with EOS
        if v is not None:
            return int(v)
    return 0


def text_context(
    model: Any, context: str | None, contexts: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(1, n_ctx, L) chunk ids and mask for a long context or a list of passages."""
    if context is None and contexts is None:
        return None
    if context is not None and contexts is not None:
        raise ValueError("pass either context (one long text) or contexts (passages), not both")
    if not model.config.is_cepe:
        raise ValueError("this model has no cross-attention layers (not a CEPE checkpoint): no context")
    tok = require_tokenizer(model)
    L = int(getattr(model, "chunk_len", DEFAULT_CHUNK_LEN))
    budget = int(getattr(model, "max_context_tokens", 0)) or None
    if contexts is None:  # one long text
        check_text(context, "context")
        ids = tok.encode(context, add_special_tokens=False)
        if not ids:
            raise ValueError("context is empty")
        chunks, mask = chunk_long_context(
            ids, chunk_len=L, pad_id=pad_id(tok), max_chunks=None if budget is None else max(1, budget // L)
        )
    else:
        if isinstance(contexts, str) or not all(isinstance(c, str) for c in contexts):
            raise TypeError("contexts must be a list of strings (one passage each)")
        for i, c in enumerate(contexts):
            check_text(c, f"contexts[{i}]")
        if budget is not None and len(contexts) * L > budget:
            raise ValueError(
                f"{len(contexts)} passages of {L} tokens exceed the context budget of {budget} tokens "
                "(model.max_context_tokens)"
            )
        chunks, mask = chunk_passages(
            [tok.encode(c, add_special_tokens=False) for c in contexts], chunk_len=L, pad_id=pad_id(tok)
        )
    return chunks[None], mask[None]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still grow into a stop string or are
    an incomplete UTF-8 sequence, so must not be emitted yet."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


def stream_text(
    model: Any,
    prompt: str,
    *,
    context: str | None = None,
    contexts: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    chat: bool = False,
) -> Iterator[str]:
    """Yields the generated text piece by piece (see Model.generate_text)."""
    tok = require_tokenizer(model)
    check_text(prompt, "prompt")
    stops = [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tok.encode(prompt, add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    ctx_ids = text_context(model, context, contexts)
    enc = {} if ctx_ids is None else {"encoder_input_ids": ctx_ids[0], "encoder_attention_mask": ctx_ids[1]}
    new: list[int] = []
    emitted = 0
    for tok_id in model.generate_stream(
        np.asarray(ids)[None], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **enc
    ):
        new.append(int(tok_id))
        text = tok.decode(new)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        upto = len(text) - _held_back(text, stops)
        if upto > emitted:
            yield text[emitted:upto]
            emitted = upto
    text = tok.decode(new)
    if len(text) > emitted:
        yield text[emitted:]
