"""cepe.train_data: what the decoder, the encoder and the labels get in each training stage
(spec CEPE.md §6.2, §6.3, §6.5), the token file layouts and the seeded window sampler."""

from __future__ import annotations

import numpy as np
import pytest

from cepe.train_data import (
    WindowSampler,
    check_token_range,
    make_batch,
    open_tokens,
    stage2_batch,
    stage_window,
    warmup_batch,
)


def stream_file(tmp_path, n=1000, dtype=np.int32, name="s.npy"):
    toks = np.arange(n, dtype=dtype) % 30000
    path = tmp_path / name
    np.save(path, toks)
    return str(path), toks


def packed(docs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[len(docs)], [len(d) for d in docs], *docs]).astype(np.int32)


# ------------------------------------------------------------------ the two stages


def test_warmup_encoder_reads_the_decoder_tokens_in_n_ctx_chunks():
    """§6.2: the decoder gets T tokens; the encoder the same T tokens as n_ctx chunks of T / n_ctx."""
    w = np.random.default_rng(0).integers(0, 100, size=(3, 256))
    b = warmup_batch(w, 4)
    assert b["input_ids"].shape == (3, 256) and b["encoder_input_ids"].shape == (3, 4, 64)
    np.testing.assert_array_equal(b["input_ids"], w)
    np.testing.assert_array_equal(b["labels"], w)  # every decoder token is a label
    np.testing.assert_array_equal(b["encoder_input_ids"].reshape(3, 256), w)  # same tokens, same order
    for j in range(4):  # chunk j is the j-th quarter, contiguous
        np.testing.assert_array_equal(b["encoder_input_ids"][:, j], w[:, 64 * j : 64 * (j + 1)])
    assert all(a.dtype == np.int64 and a.flags.c_contiguous for a in b.values())
    assert not np.shares_memory(b["labels"], b["input_ids"])


def test_stage2_encoder_reads_the_tokens_before_the_decoder_window():
    """§6.3: a window = n_ctx * ctx_len "prev" tokens + T continuation tokens; the encoder reads the
    prev tokens as chronological, contiguous, non-overlapping chunks, the decoder the continuation."""
    stream = np.arange(10_000)
    w = np.stack([stream[100 : 100 + 4 * 16 + 32], stream[900 : 900 + 4 * 16 + 32]])
    b = stage2_batch(w, n_ctx=4, ctx_len=16)
    assert b["input_ids"].shape == (2, 32) and b["encoder_input_ids"].shape == (2, 4, 16)
    np.testing.assert_array_equal(b["input_ids"][0], stream[164:196])
    np.testing.assert_array_equal(b["labels"], b["input_ids"])
    for j in range(4):
        np.testing.assert_array_equal(b["encoder_input_ids"][0, j], stream[100 + 16 * j : 116 + 16 * j])
    # the last encoder token is the one right before the first decoder token
    assert b["encoder_input_ids"][1, -1, -1] + 1 == b["input_ids"][1, 0]
    # no BOS or anything else inserted: all tokens are the window's, each once
    np.testing.assert_array_equal(np.concatenate([b["encoder_input_ids"][1].ravel(), b["input_ids"][1]]), w[1])


def test_stage_shapes_are_checked():
    with pytest.raises(ValueError, match="n_ctx=3"):
        warmup_batch(np.zeros((1, 256)), 3)
    with pytest.raises(ValueError, match="no continuation"):
        stage2_batch(np.zeros((1, 64)), 4, 16)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        warmup_batch(np.zeros(16), 4)
    assert stage_window("warmup", 256, 4, 64) == 256
    assert stage_window("stage2", 4096, 16, 256) == 8192  # the reference's 8K samples


def test_make_batch_dispatches_on_the_stage():
    w = np.arange(2 * 48).reshape(2, 48)
    np.testing.assert_array_equal(make_batch("warmup", w, 4, 0)["encoder_input_ids"].reshape(2, 48), w)
    b = make_batch("stage2", w, 2, 8)
    assert b["encoder_input_ids"].shape == (2, 2, 8) and b["input_ids"].shape == (2, 32)


# ------------------------------------------------------------------ token files


def test_layouts(tmp_path):
    path, toks = stream_file(tmp_path)
    tf = open_tokens(path)
    assert tf.layout == "stream" and tf.n_tokens == 1000 and isinstance(tf.tokens, np.memmap)
    rows = np.arange(5 * 40).reshape(5, 40).astype(np.int64)
    np.save(tmp_path / "r.npy", rows)
    tf = open_tokens(str(tmp_path / "r.npy"))
    assert tf.layout == "rows" and list(tf.lengths) == [40] * 5 and list(tf.starts) == [0, 40, 80, 120, 160]
    docs = [np.arange(7) + 100, np.arange(3) + 200, np.arange(12) + 300]
    np.save(tmp_path / "p.npy", packed(docs))
    tf = open_tokens(str(tmp_path / "p.npy"), "packed")
    assert list(tf.lengths) == [7, 3, 12]
    for s, n, d in zip(tf.starts, tf.lengths, docs, strict=True):
        np.testing.assert_array_equal(tf.tokens[s : s + n], d)


@pytest.mark.parametrize(
    "array, layout, message",
    [
        (np.zeros(10, np.float32), "auto", "integer token ids"),
        (np.zeros((2, 2, 2), np.int32), "auto", "needs a 1-D array"),
        (np.zeros((2, 5), np.int32), "stream", "needs a 1-D array"),
        (np.array([3, 2, 2, 1, 1, 1], np.int32), "packed", "does not match"),
        (np.array([9, 1], np.int32), "packed", "claims 9 documents"),
        (np.array([2, -1, 1, 5], np.int32), "packed", "gives document 0 the length -1, outside"),
    ],
)
def test_bad_token_files(tmp_path, array, layout, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=message) as e:
        open_tokens(str(tmp_path / "bad.npy"), layout, name="tokens[1]")
    assert str(e.value).startswith("tokens[1]:")


def test_missing_file_and_bad_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokens: no such token file"):
        open_tokens(str(tmp_path / "nope.npy"))
    path, _ = stream_file(tmp_path)
    with pytest.raises(ValueError, match="layout must be one of"):
        open_tokens(path, "csv")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        open_tokens(str(tmp_path / "junk.npy"))


def test_token_range_names_the_first_bad_position(tmp_path, monkeypatch):
    import cepe.train_data as td

    monkeypatch.setattr(td, "_SCAN_BLOCK", 64)  # several blocks
    toks = np.full(500, 5, np.int32)
    toks[321] = 99
    np.save(tmp_path / "t.npy", toks)
    tf = open_tokens(str(tmp_path / "t.npy"))
    check_token_range(tf, 100)
    with pytest.raises(ValueError, match=r"token id 99 at position 321, outside the model's vocabulary \[0, 50\)"):
        check_token_range(tf, 50)
    toks[10] = -1
    np.save(tmp_path / "t.npy", toks)
    with pytest.raises(ValueError, match="token id -1 at position 10"):
        check_token_range(open_tokens(str(tmp_path / "t.npy")), 100)


# ------------------------------------------------------------------ windows and sampling


def test_windows_stay_inside_sequences(tmp_path):
    """Windows never cross a document boundary, and documents shorter than a window give none
    (the reference's RP-filter keeps documents >= the window)."""
    docs = [np.full(n, i, np.int32) for i, n in enumerate([5, 30, 9, 10, 21])]
    np.save(tmp_path / "p.npy", packed(docs))
    tf = open_tokens(str(tmp_path / "p.npy"), "packed")
    s = WindowSampler([tf], window=10, stride=10)
    # doc 1 (30): 3 windows; doc 3 (10): 1; doc 4 (21): 2; docs 0 and 2 are too short
    assert len(s) == 6
    w = s.windows(range(6))
    assert [int(r[0]) for r in w] == [1, 1, 1, 3, 4, 4]
    assert all((r == r[0]).all() for r in w)  # one document per window
    with pytest.raises(IndexError):
        s.location(6)


def test_window_numbering_and_stride_over_files(tmp_path):
    a_path, a = stream_file(tmp_path, 100, name="a.npy")
    rows = (np.arange(3 * 25).reshape(3, 25) + 5000).astype(np.int32)
    np.save(tmp_path / "b.npy", rows)
    files = [open_tokens(a_path), open_tokens(str(tmp_path / "b.npy"))]
    s = WindowSampler(files, window=20, stride=15)
    assert len(s) == 6 + 3  # (100 - 20) // 15 + 1 = 6 in a; one per 25-token row in b
    np.testing.assert_array_equal(s.window_tokens(1), a[15:35])
    np.testing.assert_array_equal(s.window_tokens(7), rows[1, :20])


def test_consecutive_stage2_windows_chain(tmp_path):
    """With prev = continuation = stride (the reference's 4096 + 4096, stride 4096), the decoder
    window of sample k is the encoder context of sample k + 1."""
    path, toks = stream_file(tmp_path, 400)
    T, n_ctx, L = 32, 2, 16
    s = WindowSampler([open_tokens(path)], window=stage_window("stage2", T, n_ctx, L), stride=T)
    b = stage2_batch(s.windows([3, 4]), n_ctx, L)
    np.testing.assert_array_equal(b["encoder_input_ids"][1].ravel(), b["input_ids"][0])
    np.testing.assert_array_equal(b["input_ids"][0], toks[3 * T + n_ctx * L : 3 * T + n_ctx * L + T])


def test_sampling_is_seeded_epoch_permutations(tmp_path):
    path, _ = stream_file(tmp_path, 1000)
    tf = open_tokens(path)
    s = WindowSampler([tf], window=10, stride=10, seed=3)  # 100 windows
    steps = [s.batch_indices(k, 8) for k in range(25)]  # 200 draws = 2 epochs
    flat = np.concatenate(steps)
    assert sorted(flat[:100]) == list(range(100)) and sorted(flat[100:]) == list(range(100))
    assert not np.array_equal(flat[:100], flat[100:])  # a fresh permutation per epoch
    again = WindowSampler([tf], window=10, stride=10, seed=3)
    np.testing.assert_array_equal(again.batch_indices(17, 8), steps[17])  # step k alone, no history
    other = WindowSampler([tf], window=10, stride=10, seed=4)
    assert not np.array_equal(other.batch_indices(0, 8), steps[0])
    with pytest.raises(ValueError, match="no windows"):
        WindowSampler([tf], window=2000, stride=10).batch_indices(0, 1)
