"""Sampling settings, their checks, and cepe.Sampler: the C core's sampler chain.

One chain turns a row's logits z into its next token, in llama.cpp's order
(common/sampling.cpp, common_sampler_init: the logit bias, then
common_params_sampling.samplers), all in C:

1. logit_bias: ``z[i] += bias`` (``-inf`` bans token i)
2. penalties over the row's last ``repeat_last_n`` tokens (the prompt's
   included; -1: all of them), token i seen c > 0 times: ``z[i] /=
   repeat_penalty`` if ``z[i] > 0`` else ``z[i] *= repeat_penalty``, then
   ``z[i] -= c * frequency_penalty + presence_penalty``
3. top_k: the k largest logits
4. typical_p: the locally typical set (Meister et al. 2022): tokens by
   ``|-log p - H|`` ascending, the shortest prefix holding mass ``>= typical_p``
5. top_p: tokens by p descending, the shortest prefix holding mass ``>= top_p``
6. min_p: tokens with ``p >= min_p * max p``
7. temperature: ``softmax(z / T)`` over what is left; 0 picks the largest
8. a draw from a splitmix64 stream seeded by ``seed``

Steps 4-6 use ``p = softmax(z)`` over what the earlier steps left: the
temperature only shapes the final draw. An off setting (top_k 0, top_p 1,
min_p 0, typical_p 1, repeat_penalty 1, frequency/presence_penalty 0) skips
its step. Log-probabilities reported with tokens are the raw logits'
log-softmax, before bias and penalties (as OpenAI's API reports them).

TEXT_DEFAULTS are llama.cpp's common sampler defaults (common/common.h:
top_k 40, top_p 0.95, min_p 0.05, temp 0.8, penalty_last_n 64) with a repeat
penalty of 1.1 (llama.cpp's earlier default and ollama's; llama.cpp now
ships 1.0, which lets a small model loop) and seed 0: generate_text and
``cepe generate`` use them. generate() and generate_stream() on token ids
default to greedy decoding with no penalties, as transformers does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import numpy as np

import cepe_c

from .checks import check_int, check_keywords, check_seed

if TYPE_CHECKING:
    from typing_extensions import Unpack


TEXT_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "typical_p": 1.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "seed": 0,
}
"""The sampling settings of generate_text and ``cepe generate`` (see the module doc)."""

FINISH_REASONS = ("length", "eos", "stop")
"""Why a row stopped: max_new_tokens reached, an eos token, a stop string."""


def _check_float(name: str, value: Any, rule: str, ok: Any) -> float:
    """value as a float for which ok(v) holds; ValueError "{name} must be {rule}" otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{name} must be {rule}, got {value}") from None
    if math.isnan(v) or not ok(v):
        raise ValueError(f"{name} must be {rule}, got {value}")
    return v


def check_logit_bias(logit_bias: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A {token id: bias} mapping (ids as ints or decimal strings, as OpenAI's
    JSON sends them; bias finite or -inf) as (ids int32, biases float32)."""
    if logit_bias is None:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    if not isinstance(logit_bias, Mapping):
        raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
    ids: list[int] = []
    biases: list[float] = []
    seen: set[int] = set()
    for key, value in logit_bias.items():
        tok = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            tok = int(key)
        if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
            raise TypeError(f"logit_bias keys must be token ids (int), got {key!r}")
        if not 0 <= tok < vocab_size:
            raise ValueError(f"logit_bias token {key!r} is outside the vocabulary [0, {vocab_size})")
        b = _check_float(f"logit_bias[{key!r}]", value, "a finite number or -inf", lambda v: v < math.inf)
        if int(tok) in seen:
            raise ValueError(f"logit_bias names token {int(tok)} twice")
        seen.add(int(tok))
        ids.append(int(tok))
        biases.append(b)
    return np.asarray(ids, np.int32), np.asarray(biases, np.float32)


def check_stop(stop: Any) -> list[str]:
    """Stop strings (a str or a list of them) as a list; empty strings dropped."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in items if s]


class SamplingOptions(TypedDict, total=False):
    """The chain's settings as keyword arguments (SamplingSettings' fields, the same defaults)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repeat_penalty: float
    repeat_last_n: int
    frequency_penalty: float
    presence_penalty: float
    logit_bias: Mapping[Any, float] | None


class GenerateOptions(SamplingOptions, total=False):
    """Model.generate's keyword arguments (generate_stream takes them too; the defaults are generate's)."""

    attention_mask: Any
    seed: int | None
    eos_token_id: int | list[int] | None
    stop: str | Sequence[str] | None
    logprobs: bool
    top_logprobs: int
    details: bool
    max_tokens: int | None
    encoder_input_ids: Any
    encoder_attention_mask: Any
    encoder_hidden_states: Any
    keep_cross_kv: bool | None


@dataclass(frozen=True)
class SamplingSettings:
    """The chain's checked settings (see the module doc for each step)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Mapping[Any, float] | None = None

    def __post_init__(self) -> None:
        fields = {
            "temperature": _check_float(
                "temperature", self.temperature, "a finite number >= 0", lambda v: 0.0 <= v < math.inf
            ),
            "top_k": check_int("top_k", self.top_k, 0),
            "top_p": _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0.0 < v <= 1.0),
            "min_p": _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0.0 <= v <= 1.0),
            "typical_p": _check_float("typical_p", self.typical_p, "in (0, 1]", lambda v: 0.0 < v <= 1.0),
            "repeat_penalty": _check_float(
                "repeat_penalty", self.repeat_penalty, "a finite number > 0", lambda v: 0.0 < v < math.inf
            ),
            "repeat_last_n": check_int("repeat_last_n", self.repeat_last_n, -1),
            "frequency_penalty": _check_float(
                "frequency_penalty", self.frequency_penalty, "a finite number", math.isfinite
            ),
            "presence_penalty": _check_float(
                "presence_penalty", self.presence_penalty, "a finite number", math.isfinite
            ),
        }
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    @property
    def penalized(self) -> bool:
        """Whether step 2 does anything (so the prompt's tokens need accepting)."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        )

    def core_sampler(
        self,
        batch: int,
        vocab_size: int,
        *,
        seed: int | None,
        eos_ids: np.ndarray | None = None,
        pad_token_id: int = 0,
        stop: Sequence[str] = (),
        token_text: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Any:
        """A cepe_c.Sampler with these settings (seed None: a random one)."""
        seed = int.from_bytes(os.urandom(8), "little") if seed is None else check_seed(seed)
        bias_ids, bias = check_logit_bias(self.logit_bias, vocab_size)
        kw: dict[str, Any] = {}
        if stop:
            if token_text is None:
                raise ValueError("stop strings need the model's tokenizer (to read the generated text)")
            encoded = [s.encode("utf-8", "surrogatepass") for s in stop]  # a lone surrogate never matches
            kw = {
                "token_text": token_text[0],
                "token_offsets": token_text[1],
                "stop_text": np.frombuffer(b"".join(encoded), np.uint8).copy(),
                "stop_offsets": np.cumsum([0] + [len(e) for e in encoded]).astype(np.int32),
            }
        return cepe_c.Sampler(
            batch,
            vocab_size,
            **{f: getattr(self, f) for f in self.__dataclass_fields__ if f != "logit_bias"},  # as bias_ids, bias
            bias_ids=bias_ids,
            bias=bias,
            seed=int(seed) & (2**64 - 1),
            eos_ids=np.zeros(0, np.int32) if eos_ids is None else np.ascontiguousarray(eos_ids, np.int32),
            pad_token_id=pad_token_id,
            **kw,
        )


@dataclass
class Generation:
    """What generate() returns with details=True or logprobs=True.

    ids: (B, n) new token ids ((n,) for a 1-D prompt), finished rows padded
    with the pad token; lengths: (B,) tokens each row generated (its eos or
    the token that completed a stop string included); finish_reason: per row
    "eos", "stop" (a stop string) or "length"; logprobs (B, n) and
    top_ids / top_logprobs (B, n, top_logprobs): the raw log-softmax of each
    step (NaN and -1 at padded steps), None without logprobs=True."""

    ids: np.ndarray
    lengths: np.ndarray
    finish_reason: list[str] | str
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


class StreamToken(NamedTuple):
    """What generate_stream() yields with details=True or logprobs=True."""

    id: int
    logprob: float | None  # the raw log-softmax of the token (logprobs=True), else None
    top_logprobs: list[tuple[int, float]]  # the top_logprobs most likely (id, logprob), best first
    finish_reason: str | None  # on the last token: "eos", "stop" or "length"


class Sampler:
    """The C core's sampler chain over logits you hold (e.g. from
    Model.forward), with its own random stream and each row's token window.

    s = cepe.Sampler(model.config.vocab_size, temperature=0.8, top_k=40, seed=1)
    s.accept(prompt_ids)               # the prompt joins the penalty window
    tok = s.sample(logits[-1])         # picks, then accepts, the next token
    p = s.distribution(logits[-1])     # the distribution sample() draws from

    The settings (SamplingOptions: temperature, top_k, ... logit_bias) are those of
    Model.generate, each off by default (see the module doc)."""

    def __init__(
        self, vocab_size: int, *, batch_size: int = 1, seed: int | None = None, **settings: Unpack[SamplingOptions]
    ) -> None:
        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        check_keywords("Sampler", settings, SamplingOptions.__annotations__)
        self.settings = SamplingSettings(**settings)
        self._core = self.settings.core_sampler(self.batch_size, self.vocab_size, seed=seed)

    def _logits(self, logits: Any, row: int) -> tuple[np.ndarray, int]:
        row = check_int("row", row, 0, self.batch_size - 1)
        a = np.ascontiguousarray(logits, dtype=np.float32)
        if a.shape != (self.vocab_size,):
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("logits must be finite")
        return a, row

    def accept(self, ids: Any, attention_mask: Any = None) -> None:
        """Adds tokens to the penalty window: (T,) for one row, or (batch_size, T)."""
        a = np.asarray(ids)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[0] != self.batch_size:
            raise ValueError(f"ids must have shape (T,) or ({self.batch_size}, T), got {np.shape(ids)}")
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= self.vocab_size):
            raise ValueError(f"ids must be token ids in [0, {self.vocab_size})")
        mask = None
        if attention_mask is not None:
            mask = np.ascontiguousarray(np.asarray(attention_mask).reshape(a.shape), np.uint8)
        self._core.accept(np.ascontiguousarray(a, np.int32), mask)

    def distribution(self, logits: Any, row: int = 0) -> np.ndarray:
        """The (vocab_size,) probabilities the row's next token would be drawn
        from (0 where the chain removed a token; one-hot at temperature 0)."""
        a, row = self._logits(logits, row)
        return np.asarray(self._core.distribution(row, a))

    def sample(self, logits: Any, row: int = 0) -> int:
        """Picks the row's next token from its (vocab_size,) logits and accepts it."""
        a, row = self._logits(logits, row)
        return int(self._core.sample(row, a))

    def sample_logprobs(self, logits: Any, row: int = 0, top_logprobs: int = 0) -> StreamToken:
        """sample() with the token's raw log-probability and the top_logprobs best alternatives."""
        a, row = self._logits(logits, row)
        k = check_int("top_logprobs", top_logprobs, 0, self.vocab_size)
        tok, lp, ids, lps = self._core.sample(row, a, k)
        return StreamToken(int(tok), float(lp), list(zip(ids.tolist(), lps.tolist(), strict=True)), None)
