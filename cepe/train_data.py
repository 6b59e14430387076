"""Training batches for the two CEPE stages, cut from token files (spec CEPE.md §6.2, §6.3, §6.5).

A token file is a `.npy` of integer token ids, memory-mapped (np.load(mmap_mode="r")), in one of
three layouts:

- "stream": a 1-D array, one long stream (RP-cat: documents concatenated, [BOS] doc [EOS] kept);
- "rows": a 2-D array (n_seq, len), each row a sequence of its own;
- "packed": a 1-D array [n, len_1, ..., len_n, tokens of doc 1, ..., tokens of doc n], the
  reference's own npy format (data/*.py), each document a sequence of its own (RP-filter).

Windows of `window` tokens are cut from each sequence with stride `stride`, never across two
sequences (a sequence shorter than a window gives none: the reference's length filter). The
windows of all files are numbered in order (file, sequence, start) and drawn in a fresh random
permutation every epoch (HF Trainer's random sampler over the concatenated streams, so a mix
follows the streams' sizes). Window ids for optimizer step k are a pure function of
(seed, k, batch_size): a resumed run draws exactly the batches an uninterrupted one would.

Stages (what the decoder, the encoder and the labels get):

- warmup (§6.2): a window of T tokens; the decoder reads all T; the encoder reads the same T
  tokens split into n_ctx contiguous chunks of T / n_ctx (the reference: 256 tokens, 4 x 64); the
  labels are the decoder tokens. This teaches the cross-attention to copy.
- stage 2 (§6.3): a window of P + T tokens, P = n_ctx * ctx_len (the reference: 16 x 256 + 4096);
  the encoder reads the first P ("prev") tokens as n_ctx chronological chunks of ctx_len, the decoder
  the T continuation tokens, and the labels are all decoder tokens. No BOS is inserted anywhere
  (§6.5: chunks and windows are raw slices).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .files import describe

LAYOUTS = ("auto", "stream", "rows", "packed")
_SCAN_BLOCK = 1 << 24  # tokens per block when checking a file's ids


# ------------------------------------------------------------------ batch construction


def warmup_batch(windows: np.ndarray, n_ctx: int) -> dict[str, np.ndarray]:
    """Warmup (copy) stage, §6.2: (B, T) token windows -> input_ids (B, T) for the decoder,
    encoder_input_ids (B, n_ctx, T // n_ctx): the same tokens, in order, split into n_ctx
    contiguous chunks, and labels (B, T) = input_ids (every decoder token is predicted)."""
    w = np.asarray(windows)
    if w.ndim != 2:
        raise ValueError(f"windows must be (B, T), got shape {w.shape}")
    B, T = w.shape
    if n_ctx < 1 or T % n_ctx:
        raise ValueError(f"the decoder length ({T}) must split into n_ctx={n_ctx} equal encoder chunks")
    ids = np.ascontiguousarray(w, dtype=np.int64)
    return {
        "input_ids": ids,
        "labels": ids.copy(),
        "encoder_input_ids": ids.reshape(B, n_ctx, T // n_ctx).copy(),
    }


def stage2_batch(windows: np.ndarray, n_ctx: int, ctx_len: int) -> dict[str, np.ndarray]:
    """Stage 2, §6.3: (B, W) windows, W >= n_ctx * ctx_len + 1 -> the decoder reads the last
    T = W - n_ctx * ctx_len tokens (input_ids (B, T), labels = input_ids); the encoder reads the
    n_ctx * ctx_len tokens right before them, as n_ctx chronological, contiguous, non-overlapping
    chunks (encoder_input_ids (B, n_ctx, ctx_len))."""
    w = np.asarray(windows)
    if w.ndim != 2:
        raise ValueError(f"windows must be (B, W), got shape {w.shape}")
    B, W = w.shape
    P = n_ctx * ctx_len
    if n_ctx < 1 or ctx_len < 1 or W <= P:
        raise ValueError(f"a window of {W} tokens holds no continuation after {n_ctx} x {ctx_len} context tokens")
    ids = np.ascontiguousarray(w[:, P:], dtype=np.int64)
    return {
        "input_ids": ids,
        "labels": ids.copy(),
        "encoder_input_ids": np.ascontiguousarray(w[:, :P], dtype=np.int64).reshape(B, n_ctx, ctx_len),
    }


# ------------------------------------------------------------------ token files


@dataclass
class TokenFile:
    """One memory-mapped token file: `tokens` (1-D view) and its sequences as (start, length)
    pairs into it."""

    path: str
    layout: str
    tokens: np.ndarray
    starts: np.ndarray  # int64 (n_seq,)
    lengths: np.ndarray  # int64 (n_seq,)

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def load_npy(path: str, kind: str) -> np.ndarray:
    """The .npy array at path, memory-mapped. FileNotFoundError when there is none (or only a
    broken link), ValueError when it is no regular file or no readable .npy array; the messages
    start with the path and call the file a `kind` ("token file")."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no such {kind}: {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is a broken symlink (to {os.path.realpath(path)}), not a {kind}")
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {describe(mode)}, not a {kind} (a .npy array)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable .npy array ({exc})") from None


def open_tokens(path: str, layout: str = "auto", *, name: str = "tokens") -> TokenFile:
    """Memory-maps a token .npy file. layout "auto" is "stream" for 1-D and "rows" for 2-D
    arrays ("packed" must be asked for: it is also 1-D). Errors name `name` (the config key)."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")
    try:
        arr = load_npy(path, "token file")
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: {path} must hold integer token ids, got dtype {getattr(arr, 'dtype', None)}")
    if layout == "auto":
        layout = "rows" if arr.ndim == 2 else "stream"
    want_ndim = 2 if layout == "rows" else 1
    if arr.ndim != want_ndim:
        raise ValueError(f"{name}: {path} has shape {arr.shape}; layout {layout!r} needs a {want_ndim}-D array")
    if layout == "rows":
        n, length = arr.shape
        if not arr.flags.c_contiguous:
            raise ValueError(f"{name}: {path} must be stored in C order")
        flat = arr.reshape(-1)
        starts = np.arange(n, dtype=np.int64) * length
        lengths = np.full(n, length, dtype=np.int64)
    elif layout == "stream":
        flat = arr
        starts, lengths = np.zeros(1, np.int64), np.array([arr.shape[0]], np.int64)
    else:  # packed: [n, len_1..len_n, tokens...]
        if arr.shape[0] < 1:
            raise ValueError(f"{name}: {path} is empty (a packed file starts with its document count)")
        n = int(arr[0])
        if n < 0 or 1 + n > arr.shape[0]:
            raise ValueError(f"{name}: {path}: packed header claims {n} documents in a file of {arr.shape[0]} ids")
        header = np.asarray(arr[1 : 1 + n])
        n_tok = arr.shape[0] - 1 - n
        for bad in (header < 0, header > n_tok):  # checked before int64: a huge uint64 would wrap
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"{name}: {path}: packed header gives document {i} the length {int(header[i])}, outside "
                    f"[0, {n_tok}] (the tokens that follow the header)"
                )
        lengths = header.astype(np.int64)
        if int(lengths.sum()) != n_tok:
            raise ValueError(
                f"{name}: {path}: packed header (n={n}, lengths summing to {int(lengths.sum())}) does not match "
                f"the {n_tok} tokens that follow it"
            )
        flat = arr[1 + n :]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    return TokenFile(path=path, layout=layout, tokens=flat, starts=starts, lengths=lengths)


def check_token_range(tf: TokenFile, vocab_size: int, *, name: str = "tokens", what: str = "the model's") -> None:
    """Raises ValueError naming `name` and the first offending position if any token id is
    outside [0, vocab_size). Reads the file once, in blocks."""
    tokens = tf.tokens
    for lo in range(0, tokens.shape[0], _SCAN_BLOCK):
        block = np.asarray(tokens[lo : lo + _SCAN_BLOCK])
        if block.size and (block.min() < 0 or block.max() >= vocab_size):
            bad = int(np.flatnonzero((block < 0) | (block >= vocab_size))[0])
            raise ValueError(
                f"{name}: {tf.path} holds token id {int(block[bad])} at position {lo + bad}, outside "
                f"{what} vocabulary [0, {vocab_size})"
            )


# ------------------------------------------------------------------ windows and sampling


@dataclass
class WindowSampler:
    """Every window of `window` tokens, stride `stride`, within each sequence of `files`,
    numbered in (file, sequence, start) order; batches drawn from per-epoch permutations."""

    files: Sequence[TokenFile]
    window: int
    stride: int
    seed: int = 0
    _seq_file: np.ndarray = field(init=False, repr=False)
    _seq_start: np.ndarray = field(init=False, repr=False)
    _first: np.ndarray = field(init=False, repr=False)  # cumulative window counts, (n_seq + 1,)
    _perm: tuple[int, np.ndarray] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"window ({self.window}) and stride ({self.stride}) must be >= 1")
        file_ids, starts, counts = [], [], []
        for i, tf in enumerate(self.files):
            n = np.where(tf.lengths >= self.window, (tf.lengths - self.window) // self.stride + 1, 0)
            file_ids.append(np.full(len(n), i, dtype=np.int64))
            starts.append(tf.starts)
            counts.append(n.astype(np.int64))
        self._seq_file = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int64)
        self._seq_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        c = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        self._first = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._first[-1])

    def location(self, index: int) -> tuple[int, int]:
        """(file number, token offset in that file's token array) of window `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        seq = int(np.searchsorted(self._first, index, side="right")) - 1
        return int(self._seq_file[seq]), int(self._seq_start[seq] + (index - self._first[seq]) * self.stride)

    def window_tokens(self, index: int) -> np.ndarray:
        f, off = self.location(index)
        return np.asarray(self.files[f].tokens[off : off + self.window], dtype=np.int64)

    def windows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(indices), window) int64 tokens."""
        out = np.empty((len(indices), self.window), dtype=np.int64)
        for r, i in enumerate(indices):
            out[r] = self.window_tokens(int(i))
        return out

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._perm[1]

    def batch_indices(self, step: int, batch_size: int) -> np.ndarray:
        """Window ids of optimizer step `step` (0-based): items step*B .. step*B + B - 1 of the
        endless sequence epoch 0's permutation, epoch 1's, ..."""
        n = len(self)
        if n == 0:
            raise ValueError("there are no windows to draw from")
        out = np.empty(batch_size, dtype=np.int64)
        for r in range(batch_size):
            g = step * batch_size + r
            out[r] = self.permutation(g // n)[g % n]
        return out


def stage_window(stage: str, decoder_len: int, n_ctx: int, ctx_len: int) -> int:
    """Tokens one training example needs: T for warmup, n_ctx * ctx_len + T for stage 2."""
    return decoder_len if stage == "warmup" else n_ctx * ctx_len + decoder_len


def make_batch(stage: str, windows: np.ndarray, n_ctx: int, ctx_len: int) -> dict[str, np.ndarray]:
    if stage == "warmup":
        return warmup_batch(windows, n_ctx)
    return stage2_batch(windows, n_ctx, ctx_len)
