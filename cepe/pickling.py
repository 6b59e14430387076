"""Pickling: a Model by reference (what cepe.load was given), a KVCache by value.

    with multiprocessing.Pool(4) as pool:          # or joblib, or Ray
        pool.starmap(score, [(model, text) for text in texts])

A Model pickles as the path and the arguments cepe.load was called with, plus the settings
changed on it (chunk_len, max_context_tokens, the memory budgets): a few hundred bytes, however
large the weights. Unpickling loads it again, in the receiving process, which therefore needs the
same files (a pulled name or a Hugging Face repo id is resolved there; a relative path is recorded
as absolute). One process reuses the weights of a Model it already holds for the same path and
arguments, and keeps the last model it unpickled alive, so a pool's tasks load it once per worker.

A Model whose weights were changed in memory (trained by cepe.Trainer, or built by
attach_encoder) is not what its files hold: pickling it raises pickle.PicklingError saying to save
it (model.save(dir)) and pickle cepe.load(dir) instead.

A KVCache pickles by value: its model (by reference, as above), its tokens' keys and values, the
RoPE state and last logits (cepe_c.Context.save_state), and an attached CEPE context's encoder
states; the copy continues decoding exactly where the original stood.
"""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec

if TYPE_CHECKING:
    from .model import KVCache, Model

P = ParamSpec("P")

# Settings a user may change on a loaded Model; an instance's own values travel with it.
MODEL_SETTINGS = (
    "chunk_len",
    "max_context_tokens",
    "forward_keep_bytes",
    "cross_kv_budget_bytes",
    "prefill_kv_budget_bytes",
)


@dataclass(frozen=True)
class LoadSource:
    """What cepe.load was called with: the path (absolute when it named an existing file)
    and its other arguments, by name."""

    path: str
    kwargs: tuple[tuple[str, Any], ...]

    def key(self) -> str:
        return repr((self.path, self.kwargs))


_alive: weakref.WeakValueDictionary[str, Model] = weakref.WeakValueDictionary()
_last: list[Model] = []  # the model unpickled last, kept alive (a pool worker's next task reuses it)
_lock = threading.RLock()  # load_model calls cepe.load, which registers its model


def remember_load(load: Callable[P, Model]) -> Callable[P, Model]:
    """Wraps cepe.load so that each Model it returns records its LoadSource."""
    sig = inspect.signature(load)

    @functools.wraps(load)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Model:
        model = load(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        path = os.fspath(bound.arguments.pop("path"))
        if os.path.exists(path):
            path = os.path.abspath(path)
        source = LoadSource(path, tuple(sorted(bound.arguments.items())))
        model._set_source(source)
        with _lock:
            _alive[source.key()] = model
        return model

    return wrapper


def reduce_model(model: Model) -> tuple[Any, ...]:
    src = model._load_source
    if src is None:
        raise pickle.PicklingError(
            f"{model!r} cannot be pickled by reference: its weights were changed in memory (trained, or built "
            "by attach_encoder), so they are not what any file holds. Save it (model.save(dir)) and pickle "
            "cepe.load(dir) instead."
        )
    settings = {k: model.__dict__[k] for k in MODEL_SETTINGS if k in model.__dict__}
    return (load_model, (src.path, dict(src.kwargs)), settings or None)


def load_model(path: str, kwargs: dict[str, Any]) -> Model:
    """A Model from its pickle: the weights of a live Model loaded the same way, else cepe.load."""
    from .load import load

    key = LoadSource(path, tuple(sorted(kwargs.items()))).key()
    with _lock:
        found = _alive.get(key)
        same = found is not None and found._load_source is not None  # not trained since it was loaded
        model = found._sibling() if found is not None and same else load(path, **kwargs)
        _alive[key] = model
        _last[:] = [model]
    return model


def reduce_cache(cache: KVCache) -> tuple[Any, ...]:
    return (load_cache, (cache.model, cache.batch_size, cache.capacity, cache._ctx.save_state(), cache._attached))


def load_cache(model: Model, batch_size: int, capacity: int, state: tuple[Any, ...], attached: Any) -> KVCache:
    cache = model.create_cache(batch_size, capacity)
    if attached is not None:
        context, keep_cross_kv = attached
        model._attach(cache._ctx, context, keep_cross_kv)
        cache._attached = attached
    cache._ctx.load_state(*state)
    return cache
