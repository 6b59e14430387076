"""Text in, text out: the tokenizer-facing half of cepe.Model (generate_text,
perplexity_text), kept apart from the array API in model.py.

Spec §9.6: decoder prompts get BOS; encoder chunks are encoded without BOS,
padded with EOS and masked; a long context is cut into chunks from its end
(left truncation when it exceeds the budget), passages one per chunk."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .chunking import DEFAULT_CHUNK_LEN, chunk_long_context, chunk_passages
from .sampling import check_stop


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


def held_back(text: str, stops: Sequence[str]) -> int:
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


class Detokenizer:
    """Turns token ids into text as they arrive, decoding only a short window
    each step (the tokens of the last emitted piece and the new ones), so a
    long answer costs O(1) per token; an incomplete UTF-8 sequence waits for
    its end."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # the window's start: tokens before it are settled
        self.read = 0  # the end of what is emitted

    def add(self, token: int) -> str:
        """The text token adds (may be "", the rest coming with later tokens)."""
        self.ids.append(int(token))
        done = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return str(text[len(done) :])
        return ""

    def flush(self) -> str:
        """What add() held back, at the end (an incomplete sequence as U+FFFD)."""
        done = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return str(text[len(done) :])


def prompt_ids(model: Any, prompt: str, chat: bool | None) -> list[int]:
    """The prompt's token ids: wrapped in the chat template as a user turn
    when chat (None: when the tokenizer has a template), else with BOS."""
    tok = require_tokenizer(model)
    check_text(prompt, "prompt")
    if chat is None:
        chat = tok.chat_template is not None
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return list(ids)


def stream_text(
    model: Any,
    prompt: str,
    *,
    context: str | None = None,
    contexts: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    stop: str | Sequence[str] | None = None,
    chat: bool | None = None,
    usage: dict[str, Any] | None = None,
    **sampling: Any,
) -> Iterator[str]:
    """Yields the generated text piece by piece (see Model.generate_text);
    sampling: generate_stream()'s settings. usage, if given, receives
    prompt_tokens, completion_tokens, finish_reason ("eos", "stop" or
    "length") and the time.perf_counter() of the call's start and of the
    first and last new token (start, first_token_at, end)."""
    start = time.perf_counter()
    stops = check_stop(stop)
    ids = prompt_ids(model, prompt, chat)
    ctx_ids = text_context(model, context, contexts)
    enc = {} if ctx_ids is None else {"encoder_input_ids": ctx_ids[0], "encoder_attention_mask": ctx_ids[1]}
    info: dict[str, Any] = usage if usage is not None else {}
    info.update(prompt_tokens=len(ids), completion_tokens=0, finish_reason="length")
    info.update(start=start, first_token_at=None, end=start)
    detok = Detokenizer(require_tokenizer(model))
    pending = ""  # decoded, not yet emitted: a stop string can only begin here
    tokens = model.generate_stream(
        np.asarray(ids)[None], max_new_tokens, stop=stops or None, details=True, **sampling, **enc
    )
    try:
        for t in tokens:
            info["end"] = time.perf_counter()
            if info["first_token_at"] is None:
                info["first_token_at"] = info["end"]
            info["completion_tokens"] += 1
            pending += detok.add(t.id)
            if t.finish_reason is not None:
                info["finish_reason"] = t.finish_reason
                pending += detok.flush()
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                info["finish_reason"] = "stop"
                if cut > 0:
                    yield pending[:cut]
                return
            upto = len(pending) - held_back(pending, stops)
            if upto > 0:
                yield pending[:upto]
                pending = pending[upto:]
        pending += detok.flush()
        if pending:
            yield pending
    finally:
        tokens.close()
