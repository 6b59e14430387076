"""OpenAI-shaped completions, chat completions and embeddings over a cepe.Model.

Requests are dicts with the fields of OpenAI's /v1/completions, /v1/chat/completions and
/v1/embeddings bodies; results and stream chunks are dicts of OpenAI's shapes
("text_completion", "chat.completion", "chat.completion.chunk", "list" of "embedding").
Model.create_completion / create_chat_completion / chat and the HTTP server (cepe.serve)
parse and shape them here; the decoding itself is cepe.batching's.

Fields read (None means "not given", as in OpenAI's API): model (the server checks it),
prompt / messages, max_tokens (chat: max_completion_tokens too), temperature, top_p, n,
stop, seed, presence_penalty, frequency_penalty, logit_bias, logprobs (completions: how
many alternatives, 0-5; chat: a bool, with top_logprobs 0-20), echo (completions),
stream, stream_options.include_usage; and cepe's extensions top_k, min_p, typical_p,
repeat_penalty, repeat_last_n (the settings of cepe.sampling's chain, Model.generate's)
and cepe_context (documents for a CEPE model's encoder: each is tokenized without BOS and
cut into chunk_len-token chunks, 256 by default). The defaults are OpenAI's (temperature 1,
top_p 1, no penalties) and the extensions' are off (repeat_last_n 64). Choice i of a
request with a seed samples with seed + i. Fields this API does not act on (user,
metadata, store, service_tier, ...) are ignored; ones whose meaning it cannot honour
(tools, functions, a JSON response_format, suffix, best_of != n) raise ParamError. A bad
value raises ParamError (a ValueError) naming its field.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np

from .batching import ParamError, Row, Step, TokenLogprob, checked_settings, decode_batch
from .checks import check_keywords
from .chunking import DEFAULT_CHUNK_LEN, chunk_long_context
from .sampling import TEXT_DEFAULTS as TEXT_DEFAULTS  # Model.chat's defaults, generate_text's
from .sampling import SamplingSettings
from .text import check_text, pad_id, require_tokenizer

DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's
ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass(frozen=True)
class Limits:
    """Bounds a request must stay within.

    default_chat_tokens: a chat completion without max_tokens gets the rest of the model's
    window, at most this many tokens. max_context_tokens: the most cepe_context tokens (or
    embedding input tokens) one request may bring (0: no limit). max_n: the most choices
    (n times the prompts) of one request. max_stop: the most stop strings."""

    default_chat_tokens: int = 512
    max_context_tokens: int = 0
    max_n: int = 16
    max_stop: int = 16
    max_embedding_inputs: int = 2048


def _given(body: dict[str, Any], key: str, default: Any = None) -> Any:
    v = body.get(key)
    return default if v is None else v


def _bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = _given(body, key, default)
    if not isinstance(v, bool):
        raise ParamError(key, f"{key} must be true or false, got {v!r}")
    return v


def _int(body: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int | None:
    v = _given(body, key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamError(key, f"{key} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ParamError(key, f"{key} must be an integer in [{lo}, {hi}], got {v}")
    return v


def _text(value: Any, name: str) -> str:
    try:
        return check_text(value, name)
    except (TypeError, ValueError) as exc:
        raise ParamError(name.split("[")[0].split(".")[0], str(exc)) from None


def _stop(body: dict[str, Any], limits: Limits) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > limits.max_stop:
        raise ParamError("stop", f"stop must be a string or a list of at most {limits.max_stop} strings")
    return [_text(s, f"stop[{i}]") for i, s in enumerate(items)]


def _unsupported(body: dict[str, Any]) -> None:
    for key in ("tools", "functions"):
        if body.get(key):
            raise ParamError(key, f"{key} are not supported: this server generates text only")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ParamError("response_format", "only response_format {'type': 'text'} is supported")


class RequestFields(TypedDict, total=False):
    """The fields both OpenAI requests take, as Model.create_completion and
    Model.create_chat_completion's keyword arguments (None or absent: the default)."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    n: int | None
    stream: bool
    stream_options: dict[str, Any] | None
    stop: str | list[str] | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: dict[str, float] | None
    top_k: int | None  # cepe's extensions from here on
    min_p: float | None
    typical_p: float | None
    repeat_penalty: float | None
    repeat_last_n: int | None
    cepe_context: str | list[str] | None  # documents for a CEPE model's encoder


class ChatCompletionFields(RequestFields, total=False):
    logprobs: bool | None
    top_logprobs: int | None


class CompletionFields(RequestFields, total=False):
    echo: bool | None
    logprobs: int | None  # the number of alternatives, in the legacy API


SAMPLING_FIELDS = {  # request field -> its default (OpenAI's where OpenAI has the field)
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_penalty": 1.0,
    "repeat_last_n": 64,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}


def sampling_from(model: Any, body: dict[str, Any]) -> tuple[SamplingSettings, int | None]:
    """The sampler settings and seed of a request's fields (OpenAI's defaults: temperature 1,
    top_p 1, no penalties; cepe's extensions off)."""
    fields = {k: _given(body, k, v) for k, v in SAMPLING_FIELDS.items()}
    return checked_settings(model.config.vocab_size, seed=body.get("seed"), logit_bias=body.get("logit_bias"), **fields)


def _rows(
    prompt: list[int],
    n: int,
    budget: int,
    settings: SamplingSettings,
    seed: int | None,
    logprobs: int | None,
    stop: list[str],
    context: tuple[np.ndarray, np.ndarray] | None,
) -> list[Row]:
    """The n choices of one prompt: choice i samples with seed + i (each its own stream)."""
    return [
        Row(
            prompt,
            budget,
            settings,
            seed=None if seed is None else (seed + i) % 2**64,
            logprobs=logprobs,
            stop=stop,
            context=context,
        )
        for i in range(n)
    ]


def context_from(model: Any, value: Any, limits: Limits, name: str = "cepe_context") -> tuple[np.ndarray, np.ndarray]:
    """Documents (a string or a list of strings) as (n_ctx, chunk_len) encoder chunks and
    their mask: each document tokenized without BOS and cut into chunks of its own (its
    first chunk left-padded, as chunk_long_context does), in order."""
    if not model.config.is_cepe:
        raise ParamError(name, f"{name} needs a CEPE model (an encoder and cross-attention); this one has none")
    docs = [value] if isinstance(value, str) else value
    if not isinstance(docs, list) or not docs:
        raise ParamError(name, f"{name} must be a string or a non-empty list of strings")
    tok = require_tokenizer(model)
    L = int(getattr(model, "chunk_len", DEFAULT_CHUNK_LEN))
    chunks, masks, total = [], [], 0
    for i, d in enumerate(docs):
        ids = tok.encode(_text(d, f"{name}[{i}]"), add_special_tokens=False)
        if not ids:
            raise ParamError(name, f"{name}[{i}] is empty")
        total += len(ids)
        if limits.max_context_tokens and total > limits.max_context_tokens:
            raise ParamError(
                name, f"{name} holds more than the {limits.max_context_tokens} tokens a request's context may hold"
            )
        c, m = chunk_long_context(ids, chunk_len=L, pad_id=pad_id(tok))
        chunks.append(c)
        masks.append(m)
    return np.concatenate(chunks), np.concatenate(masks)


def _budget(model: Any, n_prompt: int, max_tokens: int | None, default: int, where: str) -> int:
    """max_tokens checked against the window (the prompt's tokens plus max_tokens must fit)."""
    window = int(model.window)
    if n_prompt >= window:
        raise ParamError(
            where,
            f"this model's maximum context length is {window} tokens, and the prompt holds {n_prompt} "
            "(give long text to a CEPE model as cepe_context)",
        )
    if max_tokens is None:
        return min(default, window - n_prompt)
    if n_prompt + max_tokens > window:
        raise ParamError(
            "max_tokens",
            f"this model's maximum context length is {window} tokens, but the prompt holds {n_prompt} and "
            f"max_tokens asks for {max_tokens} more: lower max_tokens or shorten the prompt",
        )
    return max_tokens


def chat_messages(value: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as the plain [{"role", "content"}] a chat template reads: text
    parts joined, "developer" rendered as "system"; anything else raises ParamError."""
    if not isinstance(value, list) or not value:
        raise ParamError("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ParamError("messages", f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise ParamError("messages", f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ParamError("messages", f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(_text(part.get("text"), f"messages[{i}].content[{j}].text"))
            content = "".join(parts)
        else:
            content = _text(content, f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def chat_prompt(model: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids of a conversation: the model's chat template with the generation
    prompt, encoded as the template wrote it (no BOS added)."""
    tok = require_tokenizer(model)
    if not tok.chat_template:
        raise ParamError("messages", f"{os.path.basename(model.path)} has no chat template: use completions")
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:
        raise ParamError("messages", f"the chat template failed: {exc}") from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ParamError("messages", "the conversation renders to no tokens")
    return list(ids)


def _ids_of(model: Any, item: Any, V: int, param: str, name: str, empty: str, special: bool = True) -> list[int]:
    """item (request field param, shown as name) as token ids: a string encoded (special: with
    the BOS/EOS the model expects), or a list of ids in [0, V); ParamError otherwise, or
    "{name} {empty}" when it comes to no tokens."""
    if isinstance(item, str):
        ids = require_tokenizer(model).encode(_text(item, name), add_special_tokens=special)
    elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        ids = list(item)
        if any(not 0 <= t < V for t in ids):
            raise ParamError(param, f"{name} holds a token id outside the vocabulary [0, {V})")
    else:
        raise ParamError(param, f"{param} must be a string, a list of strings, or token ids (lists of integers)")
    if not ids:
        raise ParamError(param, f"{name} {empty}")
    return ids


def _completion_prompts(model: Any, value: Any, limits: Limits) -> list[list[int]]:
    def ids_of(p: Any, name: str) -> list[int]:
        return _ids_of(model, p, model.config.vocab_size, "prompt", name, "encodes to no tokens")

    if value is None:
        raise ParamError("prompt", "prompt is required")
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        prompts = [ids_of(value, "prompt")]
    elif isinstance(value, list) and value:
        if len(value) > limits.max_n:
            raise ParamError("prompt", f"prompt holds {len(value)} prompts, at most {limits.max_n}")
        prompts = [ids_of(p, f"prompt[{i}]") for i, p in enumerate(value)]
    else:
        raise ParamError("prompt", "prompt must be a string, a list of strings, or token ids (lists of integers)")
    return prompts


# ------------------------------------------------------------------ jobs


@dataclass
class Job:
    """One request: its rows (choice i is rows[i]) and what its results need."""

    kind: Literal["text_completion", "chat.completion"]
    model: str
    rows: list[Row]
    prompt_tokens: int
    tokenizer: Any
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    echo: list[str] | None = None
    id: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))
    _started: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "cmpl" if self.kind == "text_completion" else "chatcmpl"
            self.id = f"{prefix}-{os.urandom(12).hex()}"

    def usage(self) -> dict[str, int]:
        completion = sum(r.n_generated for r in self.rows)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _token_str(self, t: int) -> str:
        return str(self.tokenizer.decode([t], skip_special_tokens=False)) if self.tokenizer is not None else ""

    def _chat_logprobs(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            s = self._token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {
            "content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in items]
        }

    def _completion_logprobs(self, items: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self._token_str(x.token) for x in items]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [x.logprob for x in items],
            "top_logprobs": [{self._token_str(t): v for t, v in x.top} for x in items],
            "text_offset": offsets,
        }

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunks(self, steps: Sequence[Step]) -> list[dict[str, Any]]:
        """The stream chunks of one decoding step's Steps (of this job's rows)."""
        out = []
        for st in steps:
            if st.finish_reason == "cancelled":
                continue
            first = st.row not in self._started
            self._started.add(st.row)
            lps = [st.logprob] if (self.logprobs and st.logprob is not None) else []
            if self.kind == "chat.completion":
                delta: dict[str, Any] = {"role": "assistant", "content": st.text} if first else {}
                if st.text and not first:
                    delta["content"] = st.text
                if not (first or delta or lps or st.finish_reason):
                    continue
                choice = {
                    "index": st.row,
                    "delta": delta,
                    "logprobs": self._chat_logprobs(lps) if lps else None,
                    "finish_reason": st.finish_reason,
                }
                out.append({**self._base("chat.completion.chunk"), "choices": [choice]})
            else:
                text = (self.echo[st.row] if (first and self.echo) else "") + st.text
                if not (text or lps or st.finish_reason):
                    continue
                offset = 0
                if lps:  # where the token's text starts in the choice's text (echo included)
                    start = len(self.rows[st.row].text) - len(self._token_str(lps[0].token))
                    offset = max(0, start) + (len(self.echo[st.row]) if self.echo else 0)
                choice = {
                    "index": st.row,
                    "text": text,
                    "logprobs": self._completion_logprobs(lps, offset) if lps else None,
                    "finish_reason": st.finish_reason,
                }
                out.append({**self._base("text_completion"), "choices": [choice]})
        return out

    def final_chunks(self) -> list[dict[str, Any]]:
        """The chunks after the last step: the usage, when stream_options.include_usage."""
        if not self.include_usage:
            return []
        obj = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return [{**self._base(obj), "choices": [], "usage": self.usage()}]

    def result(self) -> dict[str, Any]:
        """The whole response, once every row has finished."""
        choices = []
        for i, r in enumerate(self.rows):
            if self.kind == "chat.completion":
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": r.text},
                        "logprobs": self._chat_logprobs(r.logprobs) if self.logprobs else None,
                        "finish_reason": r.finish_reason,
                    }
                )
            else:
                prefix = self.echo[i] if self.echo else ""
                choices.append(
                    {
                        "index": i,
                        "text": prefix + r.text,
                        "logprobs": self._completion_logprobs(r.logprobs, len(prefix)) if self.logprobs else None,
                        "finish_reason": r.finish_reason,
                    }
                )
        return {**self._base(self.kind), "choices": choices, "usage": self.usage()}


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ParamError("stream_options", "stream_options must be an object")
    if not stream:
        raise ParamError("stream_options", "stream_options is only allowed with stream: true")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise ParamError("stream_options", "stream_options.include_usage must be true or false")
    return include


def _n(body: dict[str, Any], limits: Limits, prompts: int) -> int:
    n = _int(body, "n", 1, limits.max_n, 1)
    assert n is not None
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise ParamError("best_of", "best_of is not supported (only best_of = n)")
    if n * prompts > limits.max_n:
        raise ParamError("n", f"n times the prompts is {n * prompts}, at most {limits.max_n} choices per request")
    return n


def completion_job(model: Any, body: dict[str, Any], name: str, limits: Limits = Limits()) -> Job:
    """A /v1/completions request as a Job (ParamError naming a bad field)."""
    if not isinstance(body, dict):
        raise ParamError("body", "the request body must be a JSON object")
    _unsupported(body)
    if body.get("suffix"):
        raise ParamError("suffix", "suffix is not supported")
    prompts = _completion_prompts(model, body.get("prompt"), limits)
    n = _n(body, limits, len(prompts))
    stream = _bool(body, "stream")
    logprobs = _int(body, "logprobs", 0, 5)
    settings, seed = sampling_from(model, body)
    max_tokens = _int(body, "max_tokens", 1, 2**31 - 1)
    stop = _stop(body, limits)
    context = None if body.get("cepe_context") is None else context_from(model, body["cepe_context"], limits)
    want_echo = _bool(body, "echo")
    rows, echo = [], []
    for p in prompts:
        budget = _budget(model, len(p), max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt")
        rows += _rows(p, n, budget, settings, seed, logprobs, stop, context)
        if want_echo:
            echo += [require_tokenizer(model).decode(p)] * n
    return Job(
        "text_completion",
        name,
        rows,
        sum(len(p) for p in prompts),
        model.tokenizer,
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs is not None,
        echo=echo or None,
    )


def chat_job(model: Any, body: dict[str, Any], name: str, limits: Limits = Limits()) -> Job:
    """A /v1/chat/completions request as a Job (ParamError naming a bad field)."""
    if not isinstance(body, dict):
        raise ParamError("body", "the request body must be a JSON object")
    _unsupported(body)
    ids = chat_prompt(model, chat_messages(body.get("messages")))
    n = _n(body, limits, 1)
    stream = _bool(body, "stream")
    want_logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20)
    if top is not None and not want_logprobs:
        raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
    settings, seed = sampling_from(model, body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1, 2**31 - 1)
    budget = _budget(model, len(ids), max_tokens, limits.default_chat_tokens, "messages")
    stop = _stop(body, limits)
    context = None if body.get("cepe_context") is None else context_from(model, body["cepe_context"], limits)
    rows = _rows(ids, n, budget, settings, seed, (top or 0) if want_logprobs else None, stop, context)
    return Job(
        "chat.completion",
        name,
        rows,
        len(ids),
        model.tokenizer,
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=want_logprobs,
    )


def run_job(model: Any, job: Job) -> Iterator[list[Step]]:
    """Decodes a job's rows in the calling thread (a batch of its own)."""
    return decode_batch(model, job.rows)


def respond(model: Any, job: Job) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """The job's result, or with job.stream an iterator of its chunks."""
    if not job.stream:
        for _ in run_job(model, job):
            pass
        return job.result()

    def chunks() -> Iterator[dict[str, Any]]:
        for steps in run_job(model, job):
            yield from job.chunks(steps)
        yield from job.final_chunks()

    return chunks()


# ------------------------------------------------------------ embeddings


def embedding_inputs(model: Any, body: dict[str, Any], limits: Limits = Limits()) -> list[list[int]]:
    """The token ids of a /v1/embeddings request's input (text is encoded without BOS)."""
    if not isinstance(body, dict):
        raise ParamError("body", "the request body must be a JSON object")
    if not model.config.is_cepe:
        raise ParamError("model", "embeddings come from a CEPE encoder; this model has none")
    value = body.get("input")
    V = model.config.encoder.vocab_size if model.config.encoder else model.config.vocab_size
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise ParamError("input", "input must be a string, a list of strings, or token ids (lists of integers)")
    if len(items) > limits.max_embedding_inputs:
        raise ParamError("input", f"input holds {len(items)} items, at most {limits.max_embedding_inputs}")
    fmt = _given(body, "encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ParamError("encoding_format", f"encoding_format must be 'float' or 'base64', got {fmt!r}")
    dims = body.get("dimensions")
    d = model.config.encoder_hidden_size
    if dims is not None and dims != d:
        raise ParamError("dimensions", f"this encoder's embeddings have {d} dimensions, got dimensions={dims!r}")
    out = []
    for i, item in enumerate(items):
        ids = _ids_of(model, item, V, "input", f"input[{i}]", "is empty", special=False)
        if limits.max_context_tokens and len(ids) > limits.max_context_tokens:
            raise ParamError("input", f"input[{i}] holds {len(ids)} tokens, at most {limits.max_context_tokens}")
        out.append(ids)
    return out


def embed(model: Any, inputs: Sequence[Sequence[int]]) -> np.ndarray:
    """(len(inputs), d_enc) float32: each input cut into chunk_len-token chunks, run through
    the CEPE encoder (Model.encode), its final-normed states averaged over its real tokens
    and scaled to unit length (so a dot product is the cosine similarity)."""
    L = int(getattr(model, "chunk_len", DEFAULT_CHUNK_LEN))
    pad = pad_id(model.tokenizer) if model.tokenizer is not None else 0
    parts = [chunk_long_context(ids, chunk_len=L, pad_id=pad) for ids in inputs]
    chunks = np.concatenate([c for c, _ in parts])
    mask = np.concatenate([m for _, m in parts])
    states = model.encode(chunks, mask).reshape(len(chunks), L, -1)
    out = np.empty((len(inputs), states.shape[-1]), dtype=np.float32)
    at = 0
    for i, (c, m) in enumerate(parts):
        s, w = states[at : at + len(c)], m.astype(np.float64)[..., None]
        v = (s * w).sum(axis=(0, 1)) / w.sum()
        out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
        at += len(c)
    return out


def embedding_result(model_name: str, vectors: np.ndarray, n_tokens: int, fmt: str = "float") -> dict[str, Any]:
    def value(v: np.ndarray) -> Any:
        return base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": value(v)} for i, v in enumerate(vectors)],
        "model": model_name,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }


# --------------------------------------------------------- Model methods


def chat_reply(
    model: Any,
    messages: str | list[dict[str, Any]],
    *,
    max_new_tokens: int,
    stop: str | Sequence[str] | None,
    context: str | None,
    contexts: Sequence[str] | None,
    stream: bool,
    **sampling: Any,
) -> str | Iterator[str]:
    """Model.chat: the assistant's reply to a conversation (see there)."""
    from .text import text_context

    msgs = chat_messages([{"role": "user", "content": messages}] if isinstance(messages, str) else messages)
    ids = chat_prompt(model, msgs)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ParamError("max_new_tokens", f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    stops = _stop({"stop": stop}, Limits(max_stop=1 << 20))
    ctx = text_context(model, context, contexts)
    settings, seed = checked_settings(model.config.vocab_size, **sampling)
    row = Row(
        ids,
        max_new_tokens,
        settings,
        seed=seed,
        stop=stops,
        context=None if ctx is None else (ctx[0][0], ctx[1][0]),
    )

    def pieces() -> Iterator[str]:
        for steps in decode_batch(model, [row]):
            for st in steps:
                if st.text:
                    yield st.text

    return pieces() if stream else "".join(pieces())


def _request(model: Any, make: Any, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
    name = os.path.basename(os.path.normpath(model.path))
    job = make(
        model,
        {k: v for k, v in body.items() if v is not None},
        name,
        Limits(max_context_tokens=model.max_context_tokens),
    )
    return respond(model, job)


def create_completion(model: Any, prompt: Any, fields: CompletionFields) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """Model.create_completion: an OpenAI /v1/completions request's fields, in Python."""
    check_keywords("create_completion", fields, CompletionFields.__annotations__)
    return _request(model, completion_job, {"prompt": prompt, **fields})


def create_chat_completion(
    model: Any, messages: Any, fields: ChatCompletionFields
) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """Model.create_chat_completion: an OpenAI /v1/chat/completions request's fields, in Python."""
    check_keywords("create_chat_completion", fields, ChatCompletionFields.__annotations__)
    return _request(model, chat_job, {"messages": messages, **fields})
