"""cepe.Model: NumPy in, NumPy out, over the C core.

Thread-safety: a Model's weights are immutable, and forward()/generate()
without a cache build their own per-call state, so several threads may call
one Model at once (the GIL is released while the core computes). A KVCache is
one request's state: using one from two threads at once raises RuntimeError.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

import cepe_c

from .checks import MAX_I32, check_int, check_keywords
from .completions import (
    TEXT_DEFAULTS,
    ChatCompletionFields,
    CompletionFields,
    chat_reply,
    create_chat_completion,
    create_completion,
)
from .config import DecoderConfig
from .errors import LongInputWarning
from .pickling import LoadSource, reduce_cache, reduce_model
from .progress import bar as progress_bar
from .sampling import FINISH_REASONS, GenerateOptions, Generation, SamplingSettings, StreamToken, check_stop
from .save import save_model
from .text import check_text, require_tokenizer, stream_text, text_context

if TYPE_CHECKING:
    from typing_extensions import Unpack


STATES_LIMIT = float(np.sqrt(np.finfo(np.float32).max))  # ~1.8e19: larger values square to inf in float32


def _max_new(max_new_tokens: Any, max_tokens: Any, default: int) -> int:
    """max_new_tokens, or its OpenAI name max_tokens, checked (default when neither is given)."""
    if max_new_tokens is not None and max_tokens is not None:
        raise ValueError("give max_new_tokens or max_tokens (its OpenAI name), not both")
    if max_tokens is not None:
        return check_int("max_tokens", max_tokens, 0)
    return check_int("max_new_tokens", default if max_new_tokens is None else max_new_tokens, 0)


def _logprobs(logprobs: Any, top_logprobs: Any, vocab_size: int) -> int:
    """The alternatives per token to report, or -1 for no log-probabilities."""
    if not isinstance(logprobs, (bool, np.bool_)):
        raise TypeError(f"logprobs must be a bool, got {type(logprobs).__name__}")
    k = check_int("top_logprobs", top_logprobs, 0, vocab_size)
    if k and not logprobs:
        raise ValueError("top_logprobs needs logprobs=True")
    return k if logprobs else -1


def _generation(out: Any, sampler: Any, B: int, squeeze: bool, k: int) -> Generation:
    """A Generation from Context.generate's output and the sampler's row states."""
    ids, lp, top_ids, top_lp = out if k >= 0 else (out, None, None, None)
    lengths = np.array([sampler.generated(b) for b in range(B)], dtype=np.int64)
    reasons = [FINISH_REASONS[sampler.finished(b)] for b in range(B)]
    if not squeeze:
        return Generation(ids, lengths, reasons, lp, top_ids, top_lp)
    return Generation(
        ids[0],
        lengths[0],
        reasons[0],
        None if lp is None else lp[0],
        None if top_ids is None else top_ids[0],
        None if top_lp is None else top_lp[0],
    )


def _check_total(T: int, max_new_tokens: int) -> None:
    if T + max_new_tokens > MAX_I32:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) plus the prompt's {T} tokens exceed the {MAX_I32} tokens "
            "a context can hold"
        )


@contextlib.contextmanager
def _kv_memory(B: int, T: int, max_new_tokens: int) -> Iterator[None]:
    """A MemoryError while making a generation's context (its KV cache is
    sized for prompt + max_new_tokens up front) says which argument to lower."""
    try:
        yield
    except MemoryError as exc:
        raise MemoryError(
            f"{exc}: the KV cache holds the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) "
            f"for each of {B} rows; lower max_new_tokens"
        ) from None


def _overflowed(what: str, context: bool) -> ValueError:
    culprit = (
        "the CEPE context (encoder_hidden_states / encoder_input_ids) or the weights" if context else "the weights"
    )
    return ValueError(
        f"the forward overflowed float32: its {what} are not finite (NaN or inf); check the magnitude of {culprit}"
    )


def _as_tokens(
    value: Any, name: str, vocab_size: int, ndim: int, shapes: str, vocab: str = "vocabulary", dtypes: str = ""
) -> tuple[np.ndarray, bool]:
    """value as int32 C-contiguous token ids of ndim axes, and whether it came without the
    batch axis (ndim - 1 axes: a batch of one); errors name it (shapes: the shapes it takes)."""
    ids = np.asarray(value)
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must hold integers{dtypes}, got dtype {ids.dtype}")
    if ids.ndim not in (ndim - 1, ndim):
        raise ValueError(f"{name} must be {shapes}, got shape {ids.shape}")
    squeeze = ids.ndim == ndim - 1
    if squeeze:
        ids = ids[None]
    if 0 in ids.shape:
        raise ValueError(f"{name} must not be empty, got shape {np.shape(value)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the {vocab} [0, {vocab_size})")
    return np.ascontiguousarray(ids, dtype=np.int32), squeeze


def _as_ids(input_ids: Any, vocab_size: int) -> tuple[np.ndarray, bool]:
    """(B, T) int32 C-contiguous ids, and whether the input was 1-D."""
    return _as_tokens(input_ids, "input_ids", vocab_size, 2, "1-D (T,) or 2-D (B, T)", dtypes=" (int32 or int64)")


def _as_mask(attention_mask: Any, shape: tuple[int, ...], squeeze: bool) -> np.ndarray | None:
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask)
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.number):
        raise TypeError(f"attention_mask must hold 0/1 numbers or booleans, got dtype {mask.dtype}")
    if squeeze and mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != shape:
        raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}, input_ids needs {shape}")
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    return np.ascontiguousarray(mask, dtype=np.uint8)


def _as_positions(position_ids: Any, shape: tuple[int, ...], squeeze: bool) -> np.ndarray | None:
    if position_ids is None:
        return None
    pos = np.asarray(position_ids)
    if pos.dtype == np.bool_ or not (np.issubdtype(pos.dtype, np.integer) or np.issubdtype(pos.dtype, np.floating)):
        raise TypeError(f"position_ids must be integers or floats, got dtype {pos.dtype}")
    if squeeze and pos.ndim == 1:
        pos = pos[None, :]
    if pos.shape != shape:
        raise ValueError(f"position_ids has shape {np.shape(position_ids)}, input_ids needs {shape}")
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    if not np.isfinite(pos).all() or (pos < 0).any():
        raise ValueError("position_ids must be finite and >= 0")
    return pos


def _as_chunks(encoder_input_ids: Any, vocab_size: int) -> tuple[np.ndarray, bool]:
    """(B, n_ctx, L) int32 chunk ids, and whether the input was (n_ctx, L)."""
    shapes = "(n_ctx, L) or (B, n_ctx, L)"
    return _as_tokens(encoder_input_ids, "encoder_input_ids", vocab_size, 3, shapes, vocab="encoder vocabulary")


class _Job(NamedTuple):
    """A generation's checked arguments, its sampler and its CEPE context (Model._prepare)."""

    ids: np.ndarray
    mask: np.ndarray | None
    squeeze: bool
    B: int
    T: int
    n: int  # max_new_tokens
    settings: SamplingSettings
    k: int  # top_logprobs, -1 without logprobs
    rich: bool  # a Generation / StreamToken rather than bare ids
    context: Any
    sampler: Any
    keep_cross_kv: bool | None


def _sampling(args: dict[str, Any]) -> dict[str, Any]:
    """The sampler chain's settings and the seed from a text method's locals() (to pass on)."""
    return {k: args[k] for k in (*SamplingSettings.__dataclass_fields__, "seed")}


def _options(args: dict[str, Any]) -> dict[str, Any]:
    """generate()'s keyword arguments from its locals()."""
    return {k: v for k, v in args.items() if k in _GENERATE_DEFAULTS}


class _Context(NamedTuple):
    """A call's CEPE context: chunk ids (B, n_ctx, L) to encode (encode=True)
    or encoder states (B, N, d_enc); the mask in the same layout (or None);
    the context tokens per row."""

    array: np.ndarray
    mask: np.ndarray | None
    tokens: int
    encode: bool


def _as_context_mask(mask: Any, shape: tuple[int, ...], name: str = "encoder_attention_mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.number):
        raise TypeError(f"{name} must hold 0/1 numbers or booleans, got dtype {m.dtype}")
    if m.shape != shape and m.shape != shape[1:]:
        raise ValueError(f"{name} has shape {m.shape}, expected {shape}")
    if m.size and not np.isin(m, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return np.ascontiguousarray(np.broadcast_to(m, shape), dtype=np.uint8)  # one row's mask serves all rows


PROGRESS_AFTER_S = 2.0  # a forward call running longer than this shows a progress bar


_worker: tuple[int, queue.SimpleQueue[Any]] | None = None
_worker_lock = threading.Lock()


def _core_worker() -> queue.SimpleQueue[Any]:
    """The queue of the one thread that runs the main thread's core calls (_interruptible).

    One thread for the process's life, not one per call: the core's OpenMP team is made once
    per calling thread, and a new thread and team per call cost ~3.5 ms, a tenth of a token
    step of a 135M model decoded with forward(cache=) in a loop. Only the main thread hands it
    work, one call at a time (it waits for each, Ctrl-C included). A forked child starts its own."""
    global _worker
    with _worker_lock:
        if _worker is None or _worker[0] != os.getpid():
            jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()

            def serve() -> None:
                while True:
                    jobs.get()()

            threading.Thread(target=serve, name="cepe-core", daemon=True).start()
            _worker = (os.getpid(), jobs)
        return _worker[1]


def _interruptible(ctx: cepe_c.Context, fn: Any, *args: Any, progress: str | None = None, **kw: Any) -> Any:
    """Runs fn (a call into the C core on ctx) so that Ctrl-C stops it.

    The core runs with the GIL released, so Python's SIGINT handler cannot
    run until it returns. On the main thread the call therefore runs in a
    worker while the main thread waits in short slices; a KeyboardInterrupt
    there asks the core to stop (it checks between layers) and is re-raised
    once the worker has returned, within a fraction of a second. With
    `progress` (a label), a call still running after PROGRESS_AFTER_S shows a
    tqdm bar of the core's layer passes (ctx.progress())."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kw)
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join: an interrupted join can report a live thread as finished

    def work() -> None:
        try:
            box["out"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["err"] = exc
        finally:
            done.set()

    _core_worker().put(work)
    start = time.monotonic()
    bar = None
    try:
        while not done.wait(0.05):
            if progress is None:
                continue
            n, total = ctx.progress()
            if bar is None and total > 0 and time.monotonic() - start > PROGRESS_AFTER_S:
                bar = progress_bar(total=total, desc=progress, unit="layer", disable=None, leave=False)
            if bar is not None:
                bar.update(min(n, total) - bar.n)
    except KeyboardInterrupt:
        ctx.interrupt()
        while True:  # wait for the core to stop, even through further Ctrl-Cs
            try:
                while not done.wait(0.05):
                    pass
                break
            except KeyboardInterrupt:
                ctx.interrupt()
        raise
    finally:
        if bar is not None:
            bar.close()
    if "err" in box:
        raise box["err"]
    return box.get("out")


_DONE = object()


def _decode_in_worker(
    ctx: cepe_c.Context, sampler: Any, ids: np.ndarray, mask: np.ndarray | None, max_new_tokens: int, k: int
) -> Iterator[tuple[Any, int, bool]]:
    """A one-row decode (the prompt, then one token per step) on one worker
    thread: yields each step's Context.generate output, the row's finish code
    and whether it is the last step.

    One thread for the whole decode, not one per call (as _interruptible
    would): the core's OpenMP team is made once per calling thread, and a new
    team per token cost a fifth of the decoding speed. The worker runs ahead of
    a slow consumer; closing the iterator early, an error or Ctrl-C on the
    consuming thread stops it (the core checks between layers) and waits for it."""
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        try:
            ctx.forward(ids, None, mask, 0)
            for step in range(max_new_tokens):
                out = ctx.generate(sampler, 1, k)
                code = int(sampler.finished(0))
                last = code != 0 or step + 1 == max_new_tokens
                items.put((out, code, last))
                if last or stop.is_set():
                    return
                ctx.forward(np.ascontiguousarray((out[0] if k >= 0 else out)[:, :1]), None, None, 0)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put(exc)
        finally:
            items.put(_DONE)

    threading.Thread(target=work, name="cepe-stream", daemon=True).start()
    done = False
    try:
        while not done:
            try:
                item = items.get(timeout=0.05)  # short waits: Ctrl-C gets in between
            except queue.Empty:
                continue
            if item is _DONE:
                done = True
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        if not done:  # closed early, failed or interrupted: stop the worker, then wait for it
            stop.set()
            ctx.interrupt()
            while True:
                try:
                    if items.get() is _DONE:
                        break
                except KeyboardInterrupt:
                    ctx.interrupt()


class KVCache:
    """The key/value cache of one request (batch_size rows, up to capacity tokens each).

    Pass it to Model.forward(..., cache=) to decode incrementally: each call
    appends its tokens and attends to everything cached before them. A CEPE
    context passed with one call stays attached to the cache for the later
    calls (until another context is passed; reset() keeps it).
    """

    def __init__(self, model: Model, batch_size: int, capacity: int) -> None:
        self.model = model
        self._ctx = cepe_c.Context(model._core, batch_size, capacity)
        self._attached: tuple[Any, bool | None] | None = None  # the CEPE context attached, for pickling

    def __reduce__(self) -> tuple[Any, ...]:
        """By value: its model (by reference), keys, values and attached context (see cepe.pickling)."""
        return reduce_cache(self)

    @property
    def batch_size(self) -> int:
        return self._ctx.batch

    @property
    def capacity(self) -> int:
        return self._ctx.capacity

    def __len__(self) -> int:
        return self._ctx.length

    def reset(self) -> None:
        self._ctx.reset()

    def __repr__(self) -> str:
        return f"KVCache(batch_size={self.batch_size}, length={len(self)}, capacity={self.capacity})"


class Model:
    """A loaded decoder. Create with cepe.load()."""

    _tokenizer: Any = None
    _make_tokenizer: Callable[[], Any] | None = None  # builds _tokenizer on first use
    chunk_len: int = 256  # encoder chunk length for text contexts (spec: 256)
    max_context_tokens: int = 0  # text contexts beyond this many tokens: left-truncated / refused (0 = no limit)

    def __init__(self, core: cepe_c.Model, config: DecoderConfig, *, n_threads: int, path: str, device: str) -> None:
        self._load_source: LoadSource | None = None  # what cepe.load was given (pickling by reference)
        self._core = core
        self.config = config
        self.n_threads = n_threads
        self.path = path
        self.device = device
        self.dtype: str | None = None  # cepe.load's dtype: None = the formats as stored
        self._kept_ctx: cepe_c.Context | None = None  # forward()'s context, kept between calls
        self._kept_core: cepe_c.Model | None = None  # the core _kept_ctx was made for
        self._kept_lock = threading.Lock()  # held by the one call using _kept_ctx

    @property
    def _core(self) -> cepe_c.Model:
        return self.__core

    @_core.setter
    def _core(self, core: cepe_c.Model) -> None:
        self.__core = core
        self._load_source = None  # new weights (a Trainer's): no longer what the files hold

    @property
    def tokenizer(self) -> Any:
        """cepe.Tokenizer when the checkpoint has one, else None. A GGUF file's is built from its
        metadata when first read: a model used on token ids alone never spends the memory
        (~20 MB for a 49k-token vocabulary) or the time."""
        make = self._make_tokenizer
        if make is not None:  # two threads may both build it: the same tokenizer either way
            self._tokenizer = make()
            self._make_tokenizer = None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._make_tokenizer = None
        self._tokenizer = tokenizer

    def _defer_tokenizer(self, make: Callable[[], Any]) -> None:
        """The tokenizer is make() (once, when first read)."""
        self._tokenizer = None
        self._make_tokenizer = make

    def _set_source(self, source: LoadSource) -> None:
        self._load_source = source

    def _sibling(self) -> Model:
        """Another Model on the same (immutable) weights, with the class's default settings."""
        m = Model(self._core, self.config, n_threads=self.n_threads, path=self.path, device=self.device)
        m.dtype, m._load_source = self.dtype, self._load_source
        m._tokenizer, m._make_tokenizer = self._tokenizer, self._make_tokenizer
        return m

    def __reduce__(self) -> tuple[Any, ...]:
        """By reference: the path and cepe.load's arguments (see cepe.pickling)."""
        return reduce_model(self)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"cepe.Model({os.path.basename(self.path)!r}: {c.model_type}, {c.num_hidden_layers} layers, "
            f"d={c.hidden_size}, heads={c.num_attention_heads}/{c.num_key_value_heads}, vocab={c.vocab_size}, "
            f"device={self.device!r}, n_threads={self.n_threads})"
        )

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        head_only: bool | None = None,
        dtype: str = "float32",
        overwrite: bool = False,
    ) -> str:
        """Writes the model to a directory that cepe.load reads back to the same logits.

        head_only (default: True for a CEPE head, from attach_encoder or a head directory): only
        config.json (naming the decoder) + head.safetensors (encoder and cross-attention);
        else a full checkpoint (config.json, model.safetensors, tokenizer files, chat template,
        generation_config.json). dtype: "float32" (exact), "bfloat16" or "float16" for the
        tensors written. An existing `path` is replaced only with overwrite=True and only if it
        is a saved model directory; anything else raises FileExistsError. Returns the path."""
        return save_model(self, path, head_only=head_only, dtype=dtype, overwrite=overwrite)

    def create_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty KV cache for incremental decoding (capacity defaults to
        max_position_embeddings). batch_size and capacity are ints in
        [1, 2**31 - 1]; a cache too large for memory raises MemoryError."""
        batch_size = check_int("batch_size", batch_size, 1)
        cap = check_int("capacity", self.config.max_position_embeddings if capacity is None else capacity, 1)
        return KVCache(self, batch_size, cap)

    @property
    def window(self) -> int:
        """The most tokens (prompt and generated) the model was trained to attend
        over: max_position_embeddings, or with RoPE scaling (rope_scaling=) the
        scaled length, original_max_position_embeddings x factor when larger.
        Calls that run past it still work, with a LongInputWarning: quality
        falls off beyond the window and the cost of attention grows with the
        square of the length."""
        c = self.config
        n = c.max_position_embeddings
        rope = c.rope
        if rope is not None and rope.rope_type != "default" and rope.factor:
            n = max(n, int(rope.original_max_position_embeddings * rope.factor))
        return n

    def _warn_long(self, n_tokens: int, what: str) -> None:
        w = self.window
        if n_tokens > w:
            basis = "max_position_embeddings" if w == self.config.max_position_embeddings else "with its RoPE scaling"
            warnings.warn(
                f"{what} {n_tokens} tokens, {n_tokens / w:.1f}x the model's window of {w} ({basis}): past it "
                "the output degrades, and attention slows down with the square of the length. Give long "
                "text to a CEPE model as its context (encoder_input_ids, context=, `cepe generate "
                "--context-file`), or load the model with RoPE scaling (cepe.load(..., rope_scaling={...})).",
                LongInputWarning,
                stacklevel=3,
            )

    forward_keep_bytes: int = 64 << 20
    """forward() without a cache, and generate(), without a CEPE context keep
    their context (KV cache and scratch) for the next such call while its KV
    cache fits this budget: a fresh context costs an allocation and a page
    fault per page it touches, about 4 % of a 512-token prefill of a 135M
    model on the CPU (paired runs) and more of a short call. One call at a
    time uses it; concurrent calls make their own. 0 keeps nothing."""

    @contextlib.contextmanager
    def _call_context(
        self, batch: int, tokens: int, keepable: bool, single_pass: bool = False
    ) -> Iterator[cepe_c.Context]:
        """The context of one forward() or generate() call. keepable (no CEPE
        context will be attached): the kept one, reset, when it fits the budget
        and no other call holds it, else a new one that is kept; held until the
        with-block ends. Otherwise a new one for this call alone (single_pass:
        one whose cache holds a single layer, see _single_pass)."""
        c = self.config
        kv_bytes = c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * 4 * batch * tokens
        if not keepable or kv_bytes > self.forward_keep_bytes or not self._kept_lock.acquire(blocking=False):
            yield cepe_c.Context(self._core, batch, tokens, single_pass=single_pass)
            return
        try:
            ctx = self._kept_ctx
            if ctx is None or ctx.batch != batch or ctx.capacity < tokens or self._kept_core is not self._core:
                self._kept_ctx = None  # the old one goes before the new one is made
                ctx = self._kept_ctx = cepe_c.Context(self._core, batch, tokens)
                self._kept_core = self._core  # a Trainer swaps the core: a context of the old one is dropped
            else:
                ctx.reset()
            yield ctx
        finally:
            self._kept_lock.release()

    # ------------------------------------------------------------------ CEPE
    cross_kv_budget_bytes: int = 2 << 30
    """Cross-attention K/V are projected once per context and kept while they
    fit this budget; beyond it they are recomputed at every call (identical
    results, far less memory). Override per call with keep_cross_kv=."""
    prefill_kv_budget_bytes: int = 256 << 20
    """The budget of single-pass calls (forward without a cache, perplexity):
    there a recomputing call runs layer by layer over the whole input and
    projects each layer's K/V once, as keeping them would, so it costs no
    extra time and does not hold every layer's K/V (at 32K context tokens on
    a 135M decoder, 1.4 GiB)."""

    def encode(self, encoder_input_ids: Any, encoder_attention_mask: Any = None) -> np.ndarray:
        """Runs the CEPE encoder: (B, n_ctx, L) chunk ids -> (B, n_ctx*L, d_enc)
        float32 (final-normed states, chunks concatenated in order); (n_ctx, L)
        -> (n_ctx*L, d_enc). Each chunk is encoded on its own, bidirectionally,
        with RoPE positions 0..L-1 and its padded tokens (mask 0) not attended."""
        enc = self.config.encoder
        if enc is None:
            raise ValueError("this model has no CEPE encoder (config.json has no encoder_config)")
        ids, squeeze = _as_chunks(encoder_input_ids, enc.vocab_size)
        B, n_ctx, L = ids.shape
        mask = None if encoder_attention_mask is None else _as_context_mask(encoder_attention_mask, ids.shape)
        flat = ids.reshape(B * n_ctx, L)
        flat_mask = None if mask is None else mask.reshape(B * n_ctx, L)
        out = np.empty((B * n_ctx, L, enc.hidden_size), dtype=np.float32)
        step = max(1, 8192 // L)  # chunks per core call: a progress tick and a Ctrl-C point
        starts = range(0, B * n_ctx, step)
        with progress_bar(
            total=B * n_ctx, desc="encoding", unit="chunk", disable=None if len(starts) > 8 else True, leave=False
        ) as bar:
            for c0 in starts:
                sl = slice(c0, c0 + step)
                out[sl] = self._core.encode(flat[sl], None if flat_mask is None else flat_mask[sl])
                bar.update(out[sl].shape[0])
        out = out.reshape(B, n_ctx * L, enc.hidden_size)
        if not np.isfinite(out.sum()):  # states are final-normed: their sum cannot overflow by itself
            raise ValueError(
                "the encoder overflowed float32: its states of encoder_input_ids are not finite (NaN or inf); "
                "check the encoder's weights"
            )
        return out[0] if squeeze else out

    def _context(
        self, B: int, squeeze: bool, encoder_input_ids: Any, encoder_attention_mask: Any, encoder_hidden_states: Any
    ) -> _Context | None:
        """What a call attends to, or None: chunk ids that the core encodes
        where the decoder reads them (no round trip through Python), or
        states the caller passed."""
        if encoder_input_ids is None and encoder_hidden_states is None:
            if encoder_attention_mask is not None:
                raise ValueError("encoder_attention_mask given without encoder_input_ids or encoder_hidden_states")
            return None
        if encoder_input_ids is not None and encoder_hidden_states is not None:
            raise ValueError("pass either encoder_input_ids or encoder_hidden_states, not both")
        if not self.config.is_cepe:
            raise ValueError("this model has no cross-attention layers (not a CEPE checkpoint): no context")
        if encoder_input_ids is not None:
            chunks, one = _as_chunks(encoder_input_ids, self.config.encoder.vocab_size if self.config.encoder else 1)
            if one and not squeeze and B != 1:
                raise ValueError(f"encoder_input_ids of shape (n_ctx, L) needs a single row of input_ids, got {B}")
            if chunks.shape[0] != B:
                raise ValueError(f"encoder_input_ids has batch size {chunks.shape[0]}, input_ids has {B}")
            mask = None
            if encoder_attention_mask is not None:
                mask = _as_context_mask(encoder_attention_mask, chunks.shape)
            return _Context(chunks, mask, chunks.shape[1] * chunks.shape[2], encode=True)
        states = np.asarray(encoder_hidden_states)
        if states.ndim == 2:
            states = states[None]
        if states.ndim != 3 or states.shape[0] != B or states.shape[2] != self.config.encoder_hidden_size:
            raise ValueError(
                f"encoder_hidden_states has shape {np.shape(encoder_hidden_states)}, expected "
                f"({B}, N, {self.config.encoder_hidden_size})"
            )
        if states.shape[1] == 0:
            raise ValueError("encoder_hidden_states must hold at least one context token")
        if not np.issubdtype(states.dtype, np.floating):
            raise TypeError(f"encoder_hidden_states must be floating point, got dtype {states.dtype}")
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
            states = np.ascontiguousarray(states, dtype=np.float32)
        if not np.isfinite(states).all():
            raise ValueError("encoder_hidden_states holds NaN or Inf")
        peak = max(float(states.max()), -float(states.min()))
        if peak >= STATES_LIMIT:
            raise ValueError(
                f"encoder_hidden_states holds a value of magnitude {peak:.3g}, beyond {STATES_LIMIT:.3g} "
                "(its square overflows float32, so attention over it cannot be computed); encode() gives "
                "final-normed states, of the order of the encoder's norm weights"
            )
        mask = None
        if encoder_attention_mask is not None:
            m = np.asarray(encoder_attention_mask)
            mask = _as_context_mask(m.reshape(m.shape[0], -1) if m.ndim == 3 else m, states.shape[:2])
        return _Context(states, mask, states.shape[1], encode=False)

    def _keep_cross_kv(self, B: int, N: int, keep_cross_kv: bool | None, single_pass: bool = False) -> bool:
        if keep_cross_kv is not None:
            return bool(keep_cross_kv)
        c = self.config
        kv_bytes = c.num_cross_attn_layers * B * N * c.num_key_value_heads * c.head_dim * 8
        budget = self.cross_kv_budget_bytes
        return kv_bytes <= (min(budget, self.prefill_kv_budget_bytes) if single_pass else budget)

    def _single_pass(self, B: int, context: _Context | None, keep_cross_kv: bool | None) -> bool:
        """Whether a call without a cache can run on a context whose KV cache
        holds one layer: when its cross-attention K/V are recomputed, the call
        already runs layer by layer, so no layer's self-attention K/V are read
        after that layer (a 7B decoder's 2K tokens: 67 MB instead of 2.1 GB)."""
        return context is not None and not self._keep_cross_kv(B, context.tokens, keep_cross_kv, single_pass=True)

    def _attach(
        self,
        ctx: cepe_c.Context,
        context: _Context | None,
        keep_cross_kv: bool | None,
        single_pass: bool = False,
    ) -> None:
        if context is None:
            return
        keep = self._keep_cross_kv(ctx.batch, context.tokens, keep_cross_kv, single_pass)
        if context.encode:
            _interruptible(ctx, ctx.encode_context, context.array, context.mask, keep, progress="encoding")
        else:
            ctx.set_context(context.array, context.mask, keep)

    # --------------------------------------------------------------- decoding
    def forward(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        position_ids: Any = None,
        cache: KVCache | None = None,
        logits: Literal["all", "last"] = "all",
        encoder_input_ids: Any = None,
        encoder_attention_mask: Any = None,
        encoder_hidden_states: Any = None,
        keep_cross_kv: bool | None = None,
    ) -> np.ndarray:
        """float32 logits: (B, T, V) for (B, T) ids, (T, V) for (T,) ids; with
        logits="last", (B, V) or (V,), and the last layer runs for each row's
        last token only (every token's K/V still enter the cache).

        attention_mask (same shape, 1 = token, 0 = padding) lets a batch mix
        lengths with left padding; positions then count only real tokens, so
        each row gives the logits it would give alone. position_ids overrides
        the RoPE positions (integers or fractions). With `cache`, the tokens
        are appended to it and attend to what it already holds.

        CEPE context: encoder_input_ids (B, n_ctx, L) chunks (with
        encoder_attention_mask, 1 = real token) are encoded once and attended
        by every cross-attention layer; or pass encoder_hidden_states
        (B, N, d_enc) from encode() (finite, |x| < STATES_LIMIT ~ 1.8e19).
        Without either, a CEPE model is exactly its base decoder; so is a row
        whose encoder_attention_mask is all 0 (no context: its cross-attention
        adds 0, where a softmax over only masked keys would average them).

        A forward whose float32 arithmetic overflows raises ValueError instead
        of returning non-finite logits. Inputs longer than Model.window warn
        (LongInputWarning).
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        ids, squeeze = _as_ids(input_ids, self.config.vocab_size)
        mask = _as_mask(attention_mask, ids.shape, squeeze)
        pos = _as_positions(position_ids, ids.shape, squeeze)
        if cache is not None:
            if not isinstance(cache, KVCache) or cache.model is not self:
                raise TypeError("cache must be a KVCache made by this model's create_cache()")
            if ids.shape[0] != cache.batch_size:
                raise ValueError(f"input_ids has batch size {ids.shape[0]}, the cache was made for {cache.batch_size}")
            if len(cache) + ids.shape[1] > cache.capacity:
                raise ValueError(
                    f"input_ids holds {ids.shape[1]} tokens per row, but the cache has room for "
                    f"{cache.capacity - len(cache)} more ({len(cache)} of its capacity {cache.capacity} used): "
                    "make it with a larger capacity (create_cache(batch_size, capacity))"
                )
        context = self._context(ids.shape[0], squeeze, encoder_input_ids, encoder_attention_mask, encoder_hidden_states)
        self._warn_long(ids.shape[1] + (len(cache) if cache is not None else 0), "the input holds")
        call_ctx = (
            contextlib.nullcontext(cache._ctx)
            if cache is not None
            else self._call_context(
                ids.shape[0],
                ids.shape[1],
                keepable=context is None,
                single_pass=self._single_pass(ids.shape[0], context, keep_cross_kv),
            )
        )
        with call_ctx as ctx:
            try:
                self._attach(ctx, context, keep_cross_kv, single_pass=cache is None)
                if cache is not None and context is not None:
                    cache._attached = (context, keep_cross_kv)
                out = _interruptible(ctx, ctx.forward, ids, pos, mask, 2 if logits == "all" else 1, progress="forward")
            except KeyboardInterrupt:
                if cache is not None:  # its tokens were half appended: start it afresh
                    cache.reset()
                raise
        if not np.isfinite(out.sum()):  # one pass, no temporary: a NaN or inf anywhere shows in the sum
            raise _overflowed("logits", context is not None)
        return out[0] if squeeze else out

    __call__ = forward

    def perplexity(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        eval_window: int | None = None,
        encoder_input_ids: Any = None,
        encoder_attention_mask: Any = None,
        encoder_hidden_states: Any = None,
        keep_cross_kv: bool | None = None,
    ) -> float:
        """exp(mean over rows of the mean next-token cross-entropy) on the last
        eval_window tokens of each row (all of them by default): CEPE's LM
        evaluation protocol. Logits are produced in slices, so long inputs do
        not hold a (T, V) array."""
        ids, squeeze = _as_ids(input_ids, self.config.vocab_size)
        mask = _as_mask(attention_mask, ids.shape, squeeze)
        B, T = ids.shape
        if T < 2:
            raise ValueError("perplexity needs at least 2 tokens per row")
        if eval_window is None:
            eval_window = T - 1
        if isinstance(eval_window, bool) or not isinstance(eval_window, int) or not 1 <= eval_window <= T - 1:
            raise ValueError(f"eval_window must be an int in [1, {T - 1}], got {eval_window!r}")
        self._warn_long(T, "the input holds")
        context = self._context(B, squeeze, encoder_input_ids, encoder_attention_mask, encoder_hidden_states)
        ctx = cepe_c.Context(self._core, B, T, single_pass=self._single_pass(B, context, keep_cross_kv))
        ctx.set_rope_length(T)  # dynamic NTK / LongRoPE: the table of the whole input, as one forward
        self._attach(ctx, context, keep_cross_kv, single_pass=True)
        first_target = T - eval_window  # targets t in [first_target, T), predicted at t - 1
        keep = np.zeros((B, T - 1), dtype=bool)  # keep[:, t]: the logits at t score the token at t + 1
        keep[:, first_target - 1 :] = True
        if mask is not None:
            keep &= (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
        targets = np.full((B, T), -100, dtype=np.int32)  # -100: not scored (no logits formed for it)
        targets[:, :-1] = np.where(keep, ids[:, 1:], -100)
        # One call: the core scores a few rows at a time and never holds (T, V) logits.
        nll_tok = _interruptible(ctx, ctx.forward_nll, ids, None, mask, targets, progress="perplexity")
        nll = nll_tok[:, :-1].sum(axis=1, dtype=np.float64)
        if not np.isfinite(nll).all():
            raise _overflowed("log-probabilities", context is not None)
        count = keep.sum(axis=1)
        if (count == 0).any():
            raise ValueError("a row has no real tokens in its evaluation window")
        return float(np.exp(np.mean(nll / count)))

    def _sampler(self, settings: SamplingSettings, B: int, seed: int | None, eos: np.ndarray, stops: list[str]) -> Any:
        """The core sampler of one generate/generate_stream call."""
        pad = self.config.pad_token_id
        if pad is None or pad >= self.config.vocab_size:
            pad = int(eos[0]) if len(eos) else 0
        table = None
        if stops:
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.path} has no tokenizer: stop strings need one (to read the generated text); "
                    "end on token ids with eos_token_id instead"
                )
            table = self.tokenizer.token_bytes(self.config.vocab_size)
        return settings.core_sampler(
            B, self.config.vocab_size, seed=seed, eos_ids=eos, pad_token_id=pad, stop=stops, token_text=table
        )

    def _prepare(self, input_ids: Any, max_new_tokens: Any, o: dict[str, Any], *, one_row: bool) -> _Job:
        """generate()'s arguments (all of them, in o) checked, and the sampler and
        CEPE context they ask for; one_row: generate_stream's single row."""
        V = self.config.vocab_size
        ids, squeeze = _as_ids(input_ids, V)
        if one_row:
            if ids.shape[0] != 1:
                raise ValueError(f"generate_stream takes one row, got {ids.shape[0]}")
            squeeze = False
        n = _max_new(max_new_tokens, o["max_tokens"], 32)
        settings = SamplingSettings(**{f: o[f] for f in SamplingSettings.__dataclass_fields__})
        k = _logprobs(o["logprobs"], o["top_logprobs"], V)
        eos = self._eos_ids(o["eos_token_id"])
        stops = check_stop(o["stop"])
        mask = _as_mask(o["attention_mask"], ids.shape, squeeze)
        B, T = ids.shape
        _check_total(T, n)
        context = self._context(
            B, squeeze, o["encoder_input_ids"], o["encoder_attention_mask"], o["encoder_hidden_states"]
        )
        sampler = self._sampler(settings, B, o["seed"], eos, stops)
        rich = bool(o["details"]) or k >= 0
        return _Job(ids, mask, squeeze, B, T, n, settings, k, rich, context, sampler, o["keep_cross_kv"])

    def _start(self, job: _Job) -> None:
        """Before decoding: the long-input warning, and the prompt into the penalties' windows."""
        self._warn_long(job.T + job.n, "the prompt plus max_new_tokens hold")
        if job.settings.penalized:
            job.sampler.accept(job.ids, job.mask)

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int | None = None,
        *,
        attention_mask: Any = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Mapping[Any, float] | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        stop: str | Sequence[str] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        details: bool = False,
        max_tokens: int | None = None,
        encoder_input_ids: Any = None,
        encoder_attention_mask: Any = None,
        encoder_hidden_states: Any = None,
        keep_cross_kv: bool | None = None,
    ) -> np.ndarray | Generation:
        """New token ids, (B, n) for (B, T) input or (n,) for (T,) input.

        Each token comes from the C core's sampler chain (cepe.sampling has
        the steps and their order): logit_bias, the repeat / frequency /
        presence penalties over each row's last repeat_last_n tokens (the
        prompt's included; -1: all), top_k, typical_p, top_p, min_p, then
        temperature. The defaults are greedy decoding with every step off;
        temperature 0 is greedy over what the steps before leave. Sampling is
        reproducible for a given seed (None: a random one). A row stops at an
        eos token (eos_token_id, default: the model's generation_config/config;
        [] never stops) or once its text holds a stop string (needs the
        tokenizer; the token completing it is kept); finished rows are padded
        with the pad token, and n < max_new_tokens once every row stopped.
        max_tokens is max_new_tokens's OpenAI name (default 32).

        details=True returns a cepe.Generation (ids, per-row lengths and
        finish reasons); logprobs=True adds each token's log-probability and
        top_logprobs alternatives (the raw log-softmax, before bias and
        penalties). The CEPE context arguments are those of forward(); the
        encoder runs once per call.
        """
        job = self._prepare(input_ids, max_new_tokens, _options(locals()), one_row=False)
        B, T, n, k = job.B, job.T, job.n, job.k
        if n == 0:
            out: Any = np.zeros((B, 0), dtype=np.int32)
            if k >= 0:
                empty = np.zeros((B, 0, k), np.float32)
                out = (out, np.zeros((B, 0), np.float32), empty.astype(np.int32), empty)
        else:
            self._start(job)
            with _kv_memory(B, T, n), self._call_context(B, T + n, keepable=job.context is None) as ctx:
                self._attach(ctx, job.context, job.keep_cross_kv)
                _interruptible(ctx, ctx.forward, job.ids, None, job.mask, 0, progress="prompt")
                out = _interruptible(ctx, ctx.generate, job.sampler, n, k)
        if job.rich:
            return _generation(out, job.sampler, B, job.squeeze, k)
        return out[0] if job.squeeze else out

    def generate_stream(
        self, input_ids: Any, max_new_tokens: int | None = None, **options: Unpack[GenerateOptions]
    ) -> Iterator[int | StreamToken]:
        """Yields new token ids one at a time (batch of one row), stopping at
        eos or a stop string: the tokens generate() gives for the same
        settings and seed. With details=True or logprobs=True it yields
        cepe.StreamToken(id, logprob, top_logprobs, finish_reason), the
        finish reason on the last one."""
        check_keywords("generate_stream", options, _GENERATE_DEFAULTS)
        job = self._prepare(input_ids, max_new_tokens, {**_GENERATE_DEFAULTS, **options}, one_row=True)
        T, n, k = job.T, job.n, job.k
        if n == 0:
            return
        self._start(job)
        with _kv_memory(1, T, n):
            ctx = cepe_c.Context(self._core, 1, T + n)
        self._attach(ctx, job.context, job.keep_cross_kv)
        for out, code, last in _decode_in_worker(ctx, job.sampler, job.ids, job.mask, n, k):
            tok = int((out[0] if k >= 0 else out)[0, 0])
            if job.rich:
                top = list(zip(out[2][0, 0].tolist(), out[3][0, 0].tolist(), strict=True)) if k >= 0 else []
                yield StreamToken(
                    tok, float(out[1][0, 0]) if k >= 0 else None, top, FINISH_REASONS[code] if last else None
                )
            else:
                yield tok

    def generate_text(
        self,
        prompt: str,
        *,
        context: str | None = None,
        contexts: list[str] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.1,
        repeat_last_n: int = 64,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: Mapping[Any, float] | None = None,
        seed: int | None = 0,
        stop: str | list[str] | None = None,
        stream: bool = False,
        chat: bool | None = None,
        max_tokens: int | None = None,
    ) -> str | Iterator[str]:
        """Continues a text prompt; returns the new text, or with stream=True an
        iterator of text pieces as they are decoded.

        The sampling defaults are llama.cpp's (cepe.sampling.TEXT_DEFAULTS:
        temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.1
        over the last 64 tokens) with seed 0, so a call is reproducible (seed
        None draws a random seed); temperature=0 is greedy. The settings are
        generate()'s. max_new_tokens (max_tokens) defaults to 128.

        context: one long text for the CEPE encoder, split into chunk_len-token
        chunks (no BOS, padded with EOS, oldest tokens dropped beyond
        max_context_tokens); contexts: passages, one chunk each (left-truncated
        and left-padded, as the paper's QA evaluation). stop: strings that end
        the answer (not included). chat: wrap the prompt in the tokenizer's chat
        template as a user turn (None: when the tokenizer has one, i.e. for
        instruct models)."""
        pieces = stream_text(
            self,
            prompt,
            context=context,
            contexts=contexts,
            max_new_tokens=_max_new(max_new_tokens, max_tokens, 128),
            stop=stop,
            chat=chat,
            **_sampling(locals()),
        )
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        messages: str | list[dict[str, Any]],
        *,
        max_new_tokens: int = 512,
        temperature: float = TEXT_DEFAULTS["temperature"],
        top_k: int = TEXT_DEFAULTS["top_k"],
        top_p: float = TEXT_DEFAULTS["top_p"],
        min_p: float = TEXT_DEFAULTS["min_p"],
        typical_p: float = TEXT_DEFAULTS["typical_p"],
        repeat_penalty: float = TEXT_DEFAULTS["repeat_penalty"],
        repeat_last_n: int = TEXT_DEFAULTS["repeat_last_n"],
        frequency_penalty: float = TEXT_DEFAULTS["frequency_penalty"],
        presence_penalty: float = TEXT_DEFAULTS["presence_penalty"],
        logit_bias: Mapping[Any, float] | None = None,
        seed: int | None = TEXT_DEFAULTS["seed"],
        stop: str | list[str] | None = None,
        context: str | None = None,
        contexts: list[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The assistant's reply to a conversation ([{"role": "system"|"user"|"assistant",
        "content": str}, ...], or one user message as a str), rendered with the model's chat
        template; with stream=True an iterator of text pieces as they are decoded.

        The sampling settings and their defaults are generate_text's (cepe.sampling's
        TEXT_DEFAULTS; temperature=0 is greedy). stop: strings that end the reply (not
        included). context / contexts: a CEPE context, as generate_text takes it. Runs on
        cepe.batching's decoder, as `cepe serve` does. Bad values raise ValueError naming
        the argument."""
        return chat_reply(
            self,
            messages,
            max_new_tokens=max_new_tokens,
            stop=stop,
            context=context,
            contexts=contexts,
            stream=stream,
            **_sampling(locals()),
        )

    def create_chat_completion(
        self, messages: list[dict[str, Any]], **fields: Unpack[ChatCompletionFields]
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """An OpenAI chat completion: the fields of a /v1/chat/completions request
        (cepe.completions.ChatCompletionFields: max_tokens, temperature, top_p, n, stream,
        stream_options, stop, seed, presence/frequency_penalty, logit_bias, logprobs,
        top_logprobs, and cepe's top_k, min_p, typical_p, repeat_penalty, repeat_last_n;
        absent or None: OpenAI's default, so temperature 1), the result as a
        "chat.completion" dict, or with stream=True an iterator of "chat.completion.chunk"
        dicts. cepe_context: documents for a CEPE model's encoder. `cepe serve` answers the same."""
        return create_chat_completion(self, messages, fields)

    def create_completion(
        self, prompt: str | list[str] | list[int] | list[list[int]], **fields: Unpack[CompletionFields]
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """An OpenAI (legacy) completion of a text prompt (with BOS) or of token ids: the
        fields of a /v1/completions request (cepe.completions.CompletionFields: those of
        create_chat_completion with echo, and logprobs as a count; max_tokens defaults to 16,
        temperature to 1), the result as a "text_completion" dict, or with stream=True an
        iterator of chunks."""
        return create_completion(self, prompt, fields)

    def perplexity_text(
        self,
        text: str,
        *,
        context: str | None = None,
        contexts: list[str] | None = None,
        eval_window: int | None = None,
    ) -> float:
        """perplexity() of a text (with BOS), optionally with a CEPE context."""
        tok = require_tokenizer(self)
        ids = tok.encode(check_text(text, "text"))
        if len(ids) < 2:
            raise ValueError("the text must encode to at least 2 tokens")
        ctx = text_context(self, context, contexts)
        enc: dict[str, Any] = {} if ctx is None else {"encoder_input_ids": ctx[0], "encoder_attention_mask": ctx[1]}
        return self.perplexity(np.asarray(ids)[None], eval_window=eval_window, **enc)

    def _eos_ids(self, eos_token_id: int | list[int] | None) -> np.ndarray:
        if eos_token_id is None:
            items: list[int] = list(self.config.eos_token_id)
        elif isinstance(eos_token_id, (int, np.integer)) and not isinstance(eos_token_id, bool):
            items = [int(eos_token_id)]
        elif isinstance(eos_token_id, (list, tuple)):
            items = list(eos_token_id)
        else:
            raise TypeError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
        for t in items:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.config.vocab_size:
                raise ValueError(f"eos_token_id {t!r} is outside the vocabulary [0, {self.config.vocab_size})")
        return np.asarray(items, dtype=np.int32)


_GENERATE_DEFAULTS: dict[str, Any] = {
    name: p.default
    for name, p in inspect.signature(Model.generate).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
"""generate()'s keyword arguments and their defaults, read from its signature (generate_stream takes the same)."""
