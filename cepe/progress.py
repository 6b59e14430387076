"""cepe.progress: tqdm progress bars, importing tqdm only when a bar shows.

    with bar(total=n, desc="loading", unit="tensor", leave=False) as b:
        b.update(1)

tqdm.auto brings asyncio and ~9 MB of resident memory with it; a model loaded in a script, a
server or a benchmark (stderr not a terminal) never shows a bar, so it never pays for one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class _Hidden:
    """What a hidden bar is asked: the tqdm methods cepe calls, doing nothing."""

    n = 0

    def __enter__(self) -> _Hidden:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: float = 1) -> None:
        return None

    def set_postfix(self, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None

    def write(self, s: str) -> None:
        """tqdm.write prints even where the bar is disabled: so does a hidden bar."""
        print(s)


def shows(disable: bool | None) -> bool:
    """Whether tqdm would show a bar given `disable`: None (tqdm's auto) shows one on a terminal."""
    if disable is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return not disable


def bar(*, disable: bool | None = None, **kwargs: Any) -> Any:
    """tqdm.auto.tqdm(disable=disable, **kwargs) when it would show, else a bar that does nothing."""
    if not shows(disable):
        return _Hidden()
    from tqdm.auto import tqdm

    return tqdm(disable=disable, **kwargs)


def track(iterable: Iterable[T], *, disable: bool | None = None, **kwargs: Any) -> Iterable[T]:
    """tqdm.auto.tqdm(iterable, ...) when it would show, else the iterable itself."""
    if not shows(disable):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable, **kwargs)
