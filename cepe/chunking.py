"""Turning context into CEPE encoder chunks (spec §2, §7, §9.6).

Chunks are token ids without BOS, `chunk_len` long (256 in every released
configuration), padded with the pad id (= EOS) and masked (mask 0). Two
policies:

- `chunk_long_context`: one long document split into consecutive chunks, in
  order. When it does not fill a whole number of chunks the *first* chunk is
  left-padded, so the end of the context stays contiguous; with `max_chunks`
  the oldest tokens are dropped (left truncation), keeping the context closest
  to the decoder's window.
- `chunk_passages`: one chunk per passage (retrieved documents, in-context
  demonstrations), each truncated and padded on the side given (the paper's
  QA evaluation: left padding, left truncation; its retrieval-LM evaluation
  truncates and pads on the right).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_CHUNK_LEN = 256


def _check_len(chunk_len: int) -> None:
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")


def chunk_long_context(
    ids: Sequence[int] | np.ndarray, *, chunk_len: int = DEFAULT_CHUNK_LEN, pad_id: int, max_chunks: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(n_ctx, chunk_len) int64 ids and their 0/1 mask for one long context."""
    _check_len(chunk_len)
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise ValueError("the context is empty")
    if max_chunks is not None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        arr = arr[-max_chunks * chunk_len :]  # left truncation: keep the most recent tokens
    n = -(-arr.size // chunk_len)
    pad = n * chunk_len - arr.size
    out = np.full(n * chunk_len, pad_id, dtype=np.int64)
    mask = np.zeros(n * chunk_len, dtype=np.int64)
    out[pad:] = arr
    mask[pad:] = 1
    return out.reshape(n, chunk_len), mask.reshape(n, chunk_len)


def chunk_passages(
    passages: Sequence[Sequence[int]],
    *,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    pad_id: int,
    truncation_side: str = "left",
    padding_side: str = "left",
) -> tuple[np.ndarray, np.ndarray]:
    """(n_passages, chunk_len) ids and mask: one chunk per passage."""
    _check_len(chunk_len)
    for name, side in (("truncation_side", truncation_side), ("padding_side", padding_side)):
        if side not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
    if len(passages) == 0:
        raise ValueError("no passages to chunk")
    out = np.full((len(passages), chunk_len), pad_id, dtype=np.int64)
    mask = np.zeros((len(passages), chunk_len), dtype=np.int64)
    for i, passage in enumerate(passages):
        p = np.asarray(passage, dtype=np.int64).reshape(-1)
        if p.size > chunk_len:
            p = p[-chunk_len:] if truncation_side == "left" else p[:chunk_len]
        if padding_side == "left":
            out[i, chunk_len - p.size :] = p
            mask[i, chunk_len - p.size :] = 1
        else:
            out[i, : p.size] = p
            mask[i, : p.size] = 1
    return out, mask


def unchunk(chunks: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """The real tokens of each chunk (the inverse of the padding above)."""
    return [c[m.astype(bool)].tolist() for c, m in zip(np.asarray(chunks), np.asarray(mask), strict=True)]
