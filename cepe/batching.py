"""Batched decoding of independent requests: one forward per step for all of them.

`decode_batch(model, rows)` runs several requests (`Row`s: a prompt, a token budget, stop
strings, sampling settings and an optional CEPE context each) through one KV cache of
len(rows) rows. The prompts are left-padded to the longest one and prefilled in one
forward; then every step feeds each unfinished row its last token, again in one forward
(a finished row gets a padding token with mask 0, which changes nothing), and picks each
row's next token with that row's own sampler. Each row finishes on its own (an end-of-
sequence token, a stop string, its max_new_tokens, or cancel()); the batch ends when every
row has. A row's output does not depend on the other rows: the left padding is masked and
positions count real tokens only (Model.forward), and every row samples from its own
random stream (seeded by its seed), so a request answers the same alone or in a batch.

Rows with a CEPE context attend to their own encoder states; their states are padded to
the longest context of the batch and masked, and rows without a context get an all-zero
mask, under which cross-attention adds exactly 0 (the base decoder).

Each row picks its tokens with a sampler chain of its own (cepe.sampling: the C core's
chain, llama.cpp's order, as Model.generate uses it), seeded with the row's seed, with the
row's prompt in its penalty window; logprobs are the model's own (the raw logits'
log-softmax). Stop strings and the text are handled here, on the decoded text, so that a
stream never shows the start of a stop string that then ends the reply.

This is the engine of cepe.serve (requests that arrive together share the forward
passes) and of Model.create_completion / create_chat_completion / chat (a batch of one).
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import check_seed
from .errors import LongInputWarning
from .sampling import SamplingSettings, check_logit_bias
from .text import held_back


class ParamError(ValueError):
    """A request parameter with a bad value; `param` names it (as OpenAI's error objects do)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def checked_settings(vocab_size: int, seed: Any = None, **settings: Any) -> tuple[SamplingSettings, int | None]:
    """SamplingSettings(**settings) for a model of vocab_size tokens, and the seed, checked;
    ParamError naming the bad one."""
    try:
        out = SamplingSettings(**settings)
        check_logit_bias(out.logit_bias, vocab_size)
    except (TypeError, ValueError) as exc:
        m = re.match(r"[a-z_]+", str(exc))
        raise ParamError(m.group(0) if m else "sampling", str(exc)) from None
    if seed is not None:
        try:
            seed = check_seed(seed)
        except ValueError as exc:
            raise ParamError("seed", str(exc)) from None
        if seed >= 2**64:
            raise ParamError("seed", f"seed must be below 2**64, got {seed}")
    return out, seed


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, its log-probability, and the top alternatives' (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# ------------------------------------------------------------------ rows


@dataclass
class Step:
    """What one row produced in one step: new text (possibly empty: held back while it may
    still be the start of a stop string or of a UTF-8 character), the token it picked
    (None when cancelled), its logprobs (when asked for; None for an end-of-sequence
    token), and finish_reason ("stop", "length", "cancelled") on the row's last step."""

    row: int
    text: str = ""
    token: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class Row:
    """One request of a batch: prompt ids, a budget of new tokens, stop strings, sampling
    settings and, for a CEPE model, an optional context ((n_ctx, L) chunk ids and their
    0/1 mask). After decode_batch: .tokens (the output ids, without the end-of-sequence
    token) and their .logprobs (when asked for), .text (the output text, cut before a
    stop string), .n_generated (every token picked, an end-of-sequence token included)
    and .finish_reason."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        settings: SamplingSettings,
        *,
        seed: int | None = None,
        logprobs: int | None = None,
        stop: Sequence[str] = (),
        context: tuple[np.ndarray, np.ndarray] | None = None,
        eos_ids: Sequence[int] | None = None,
    ) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("a prompt must hold at least one token")
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.settings = settings
        self.seed = seed
        self.logprobs_k = logprobs
        self.stop = [s for s in stop if s]
        self.context = context
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.n_generated = 0
        self.finish_reason: str | None = None
        self._emitted = 0
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Ends the row at its next step (finish_reason "cancelled"); safe from any thread."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _advance(self, tok: Any, index: int, token: int, eos: bool, lp: TokenLogprob | None) -> Step:
        """Takes one picked token: updates text and finish state, returns what to emit."""
        step = Step(index, token=token)
        self.n_generated += 1
        if eos:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            if lp is not None:
                self.logprobs.append(lp)
                step.logprob = lp
            text = tok.decode(self.tokens) if tok is not None else ""
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.finish_reason = "stop"
                text = text[:cut]
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
            self.text = text
        if self.finish_reason is not None:
            step.text = self.text[self._emitted :]
            self._emitted = len(self.text)
            step.finish_reason = self.finish_reason
        else:
            upto = len(self.text) - held_back(self.text, self.stop)
            if upto > self._emitted:
                step.text = self.text[self._emitted : upto]
                self._emitted = upto
        return step

    def _finish(self, index: int, reason: str) -> Step:
        self.finish_reason = reason
        step = Step(index, text=self.text[self._emitted :], finish_reason=reason)
        self._emitted = len(self.text)
        return step


def _contexts(model: Any, rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """The batch's encoder states (B, N, d) and mask (B, N): each row's own, padded."""
    if all(r.context is None for r in rows):
        return {}
    states = [None if r.context is None else model.encode(r.context[0], r.context[1]) for r in rows]
    masks = [None if r.context is None else np.asarray(r.context[1]).reshape(-1) for r in rows]
    N = max(s.shape[0] for s in states if s is not None)
    d = next(s.shape[1] for s in states if s is not None)
    out = np.zeros((len(rows), N, d), dtype=np.float32)
    mask = np.zeros((len(rows), N), dtype=np.uint8)
    for i, (s, m) in enumerate(zip(states, masks, strict=True)):
        if s is not None and m is not None:
            out[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = m
    return {"encoder_hidden_states": out, "encoder_attention_mask": mask}


def decode_batch(model: Any, rows: Sequence[Row]) -> Iterator[list[Step]]:
    """Decodes rows together (see the module docstring); yields, after each forward, the
    Steps of the rows still running. A row cancelled from another thread ends at its
    next step. Exceptions of the model (bad context, interrupt) propagate; the rows are
    then left unfinished."""
    if not rows:
        return
    tok = model.tokenizer
    V = model.config.vocab_size
    default_eos = [int(t) for t in model.config.eos_token_id]
    eos = [set(default_eos if r.eos_ids is None else (int(t) for t in r.eos_ids)) for r in rows]
    samplers = [r.settings.core_sampler(1, V, seed=r.seed) for r in rows]
    for r, smp in zip(rows, samplers, strict=True):
        if r.settings.penalized:
            smp.accept(np.asarray([r.prompt_ids], dtype=np.int32), None)
    B = len(rows)
    T = max(len(r.prompt_ids) for r in rows)
    pad = model.config.pad_token_id
    if pad is None or not 0 <= pad < V:
        pad = default_eos[0] if default_eos else 0
    ids = np.full((B, T), pad, dtype=np.int32)
    mask = np.zeros((B, T), dtype=np.uint8)
    for i, r in enumerate(rows):
        ids[i, T - len(r.prompt_ids) :] = r.prompt_ids
        mask[i, T - len(r.prompt_ids) :] = 1
    steps = max(r.max_new_tokens for r in rows)
    enc = _contexts(model, rows)
    cache = model.create_cache(B, T + steps)
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in rows)
    over = longest > model.window
    if over:
        warnings.warn(
            f"the prompt plus max_new_tokens hold {longest} tokens, past the model's window of {model.window}: "
            "the output degrades there",
            LongInputWarning,
            stacklevel=2,
        )

    def forward(ids: np.ndarray, mask: np.ndarray, **kw: Any) -> np.ndarray:
        if not over:
            return model.forward(ids, attention_mask=mask, cache=cache, logits="last", **kw)
        with warnings.catch_warnings():  # warned once above, not once per step
            warnings.simplefilter("ignore", LongInputWarning)
            return model.forward(ids, attention_mask=mask, cache=cache, logits="last", **kw)

    logits = forward(ids, mask, **enc)
    for _ in range(steps):
        out: list[Step] = []
        nxt = np.full((B, 1), pad, dtype=np.int32)
        live = np.zeros((B, 1), dtype=np.uint8)
        for i, r in enumerate(rows):
            if r.finish_reason is not None:
                continue
            if r.cancelled:
                out.append(r._finish(i, "cancelled"))
                continue
            lp = None
            if r.logprobs_k is None:
                t = int(samplers[i].sample(0, logits[i]))
            else:
                t, p, top_ids, top_lps = samplers[i].sample(0, logits[i], r.logprobs_k)
                t = int(t)
                lp = TokenLogprob(t, float(p), tuple(zip(top_ids.tolist(), top_lps.tolist(), strict=True)))
            out.append(r._advance(tok, i, t, t in eos[i], lp))
            if r.finish_reason is None:
                nxt[i, 0], live[i, 0] = t, 1
        yield out
        if not live.any():
            return
        logits = forward(nxt, live)
