"""Training checkpoints and training inputs: what Trainer.save may replace, the leftovers of a
killed save, corrupt, huge or non-regular trainer_state.json / optimizer.safetensors, bad token
files, and seeds refused the same way on every path. Each error names the file or argument."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import threading

import numpy as np
import pytest
from conftest import edit_json
from safetensors.numpy import load_file, save_file

import cepe
from cepe import CheckpointError, ConfigError
from cepe.testing.reference import make_reference
from cepe.train_data import open_tokens
from cepe.train_run import open_data, parse_config


@pytest.fixture(scope="module")
def cepe_dir(tmp_path_factory):
    return make_reference(seed=3).save(str(tmp_path_factory.mktemp("bad_train_model")))


def a_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # make_reference's vocabularies: 101 (decoder), 103 (encoder)
    return {"input_ids": rng.integers(3, 101, size=(1, 6)), "encoder_input_ids": rng.integers(3, 103, size=(1, 2, 4))}


@pytest.fixture
def trainer(cepe_dir):
    t = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn", total_steps=4, lr=1e-2)
    t.step(a_batch())
    return t


@pytest.fixture(scope="module")
def checkpoint(cepe_dir, tmp_path_factory):
    """A checkpoint after one step; tests edit copies of it (ckpt)."""
    t = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn+encoder", total_steps=4, lr=1e-2)
    t.step(a_batch())
    return t.save(tmp_path_factory.mktemp("bad_train_ckpt") / "ckpt")


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, str(tmp_path / "ckpt"))


def resume(path):
    return cepe.Trainer.resume(path, n_threads=1)


def test_gradients_that_overflow_raise_and_change_nothing(cepe_dir):
    """A loss coefficient far too large makes the gradients overflow float32: step() raises
    ValueError naming the cause, and the weights, moments and step count stay as they were."""
    t = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn", total_steps=4, lr=1e-2, lm_loss_cof=1e308)
    params, m = t.params.copy(), t.adam_m.copy()
    with pytest.raises(ValueError, match=r"the gradient norm is .*nan.*no update made .* overflowed float32"):
        t.step(a_batch())
    np.testing.assert_array_equal(t.params, params)
    np.testing.assert_array_equal(t.adam_m, m)
    assert t.step_count == 0


# ------------------------------------------------------------------ what save may replace


def test_save_keeps_unrelated_files(trainer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("x")
    with pytest.raises(
        FileExistsError, match=re.escape(f"{out} exists and is not a Trainer checkpoint (it holds results.csv)")
    ):
        trainer.save(out)
    assert os.listdir(out) == ["results.csv"] and (out / "results.csv").read_text() == "x"
    assert os.listdir(tmp_path) == ["out"]  # no temporary directory or .old left


def test_save_refuses_the_working_directory(trainer, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match=r"is not a Trainer checkpoint \(it holds notes.txt\)"):
        trainer.save(".")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_save_refuses_a_regular_file(trainer, tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("data")
    with pytest.raises(
        FileExistsError, match=re.escape(f"{f} exists and is not a Trainer checkpoint (a regular file)")
    ):
        trainer.save(f)
    assert f.read_text() == "data" and os.listdir(tmp_path) == ["ckpt"]


def test_save_refuses_a_model_directory(trainer, cepe_dir, tmp_path):
    """A saved model (no trainer_state.json) is not a checkpoint save() wrote: it stays."""
    model = shutil.copytree(cepe_dir, str(tmp_path / "model"))
    before = sorted(os.listdir(model))
    with pytest.raises(FileExistsError, match="a model's files but no trainer_state.json"):
        trainer.save(model)
    assert sorted(os.listdir(model)) == before and sorted(os.listdir(tmp_path)) == ["model"]


def test_save_refuses_a_foreign_old_sibling(trainer, tmp_path):
    path = trainer.save(tmp_path / "ckpt")
    (tmp_path / "ckpt.old").mkdir()
    (tmp_path / "ckpt.old" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(f"{path}.old is in the way") + ".*it holds mine.txt"):
        trainer.save(path)
    assert (tmp_path / "ckpt.old" / "mine.txt").read_text() == "x"
    assert resume(path).step_count == 1


def test_save_replaces_its_own_checkpoint_and_an_empty_directory(trainer, tmp_path):
    (tmp_path / "ckpt").mkdir()
    path = trainer.save(tmp_path / "ckpt")
    trainer.step(a_batch(1))
    assert trainer.save(path) == path
    assert resume(path).step_count == 2 and os.listdir(tmp_path) == ["ckpt"]


# ------------------------------------------------------------------ leftovers of a killed save


def leave_leftovers(path: str) -> tuple[str, str]:
    """What killed saves of `path` leave beside it: a half-written temporary directory (killed
    while writing) and a half-deleted path.old (killed while removing the previous checkpoint)."""
    tmp = path + ".tmp-k1ll3d_0"
    os.mkdir(tmp)
    shutil.copy(os.path.join(path, "config.json"), tmp)
    with (
        open(os.path.join(path, "model.safetensors"), "rb") as src,
        open(os.path.join(tmp, "model.safetensors"), "wb") as dst,
    ):
        dst.write(src.read(1000))
    old = shutil.copytree(path, path + ".old")
    os.remove(os.path.join(old, "trainer_state.json"))
    return tmp, old


@pytest.mark.parametrize("by", ["save", "resume"])
def test_leftovers_of_a_killed_save_are_removed(trainer, ckpt, by):
    tmp, old = leave_leftovers(ckpt)
    not_ours = ckpt + ".tmp-notmine0"  # the name of a leftover, but holding other files
    os.mkdir(not_ours)
    with open(os.path.join(not_ours, "data.bin"), "wb") as f:
        f.write(b"keep")
    if by == "save":
        trainer.save(ckpt)
    else:
        resume(ckpt)
    assert not os.path.exists(tmp) and not os.path.exists(old)
    assert os.listdir(not_ours) == ["data.bin"]


def test_a_running_saves_directory_is_left_alone(ckpt):
    """A temporary directory that a save in progress holds (locked) is not a leftover."""
    tmp = ckpt + ".tmp-running0"
    os.mkdir(tmp)
    shutil.copy(os.path.join(ckpt, "config.json"), tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        resume(ckpt)
        assert os.listdir(tmp) == ["config.json"]
    finally:
        os.close(fd)
    resume(ckpt)  # released: a leftover now
    assert not os.path.exists(tmp)


# ------------------------------------------------------------------ optimizer.safetensors


def edit_optimizer(path: str, fn) -> None:
    f = os.path.join(path, "optimizer.safetensors")
    tensors = {k: v.copy() for k, v in load_file(f).items()}
    fn(tensors)
    save_file(tensors, f)


def _set(name: str, index: int, value: float):
    def fn(t):
        t[name][index] = value

    return fn


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("adam_v", 3, -1e-3), r"tensor adam_v holds 1 non-finite or negative value\(s\), the first -0\.001"),
        (_set("adam_m", 5, np.nan), r"tensor adam_m holds 1 non-finite value\(s\), the first nan at index 5 \(in "),
        (_set("adam_v", 0, np.inf), r"tensor adam_v holds 1 non-finite or negative value\(s\), the first inf"),
        (lambda t: t.update(adam_m=t["adam_m"].astype(np.float16)), "tensor adam_m has dtype F16, expected F32"),
        (lambda t: t.update(adam_v=t["adam_v"][:-1].copy()), r"tensor adam_v has shape \(\d+,\), expected \(\d+,\)"),
        (lambda t: t.pop("adam_v"), "missing tensor adam_v"),
        (lambda t: t.update(step=np.zeros(1, np.float32)), "unexpected tensor step"),
    ],
)
def test_corrupt_optimizer_state_is_refused(ckpt, edit, message):
    edit_optimizer(ckpt, edit)
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(ckpt, "optimizer.safetensors")) + ": " + message):
        resume(ckpt)


def test_missing_optimizer_state(ckpt):
    os.remove(os.path.join(ckpt, "optimizer.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}: no optimizer.safetensors")):
        resume(ckpt)


# ------------------------------------------------------------------ trainer_state.json


def edit_state(path: str, fn) -> None:
    edit_json(os.path.join(path, "trainer_state.json"), fn)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(step=10**30), r"step must be an int in \[0, 9223372036854775807\], got 1000000"),
        (lambda s: s.update(step=-1), r"step must be an int in \[0, 9223372036854775807\], got -1"),
        (lambda s: s.update(step=2.5), "step must be an int in .*, got 2.5"),
        (lambda s: s.update(step=True), "step must be an int in .*, got True"),
        (lambda s: s.pop("lr"), "missing key 'lr'"),
        (lambda s: s.pop("layout"), "missing key 'layout'"),
        (lambda s: s.update(lr="fast"), "lr must be a number, got str"),
        (lambda s: s.update(lr=float("nan")), "lr must be a finite number"),
        (lambda s: s.update(total_steps=10**30), "total_steps must be <= 9223372036854775807"),
        (lambda s: s.update(seed=-1), "seed must be a non-negative int, got -1"),
        (lambda s: s.update(betas=0.9), "betas must be a list of two numbers, got 0.9"),
        (lambda s: s.update(format=2), "unsupported trainer_state format 2"),
        (lambda s: s.update(init="xavier"), "init must be one of"),
        (lambda s: s.update(layout=s["layout"][:-1]), "the checkpoint.s parameter layout does not match"),
    ],
)
def test_bad_trainer_state_is_refused(ckpt, edit, message):
    edit_state(ckpt, edit)
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(ckpt, "trainer_state.json")) + ": " + message):
        resume(ckpt)


@pytest.mark.parametrize(
    "text, message", [("half", "is not valid JSON"), ("[1, 2]", "expected a JSON object, got list")]
)
def test_truncated_or_wrong_trainer_state(ckpt, text, message):
    f = os.path.join(ckpt, "trainer_state.json")
    with open(f) as fh:
        whole = fh.read()
    with open(f, "w") as fh:
        fh.write(whole[: len(whole) // 2] if text == "half" else text)
    with pytest.raises(CheckpointError, match=re.escape(f) + ".*" + message):
        resume(ckpt)


def test_huge_trainer_state_is_refused_unread(ckpt):
    f = os.path.join(ckpt, "trainer_state.json")
    with open(f, "a") as fh:
        fh.write(" " * (16 * 2**20))  # still valid JSON, but no trainer_state.json is this large
    with pytest.raises(
        CheckpointError, match=re.escape(f) + r": trainer_state.json is \d+ bytes, more than the 16 MiB"
    ):
        resume(ckpt)


def fifo_or_dev_zero(path: str, kind: str) -> None:
    os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


def resume_unblocking(path: str, fifo: str):
    """resume(path), with a watchdog that feeds a FIFO's reader EOF should it block, so a
    regression fails instead of hanging the run."""

    def unblock():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    timer = threading.Timer(30, unblock)
    timer.start()
    try:
        return resume(path)
    finally:
        timer.cancel()


@pytest.mark.parametrize("kind, words", [("fifo", "a FIFO"), ("zero", "a character device")])
@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.safetensors"])
def test_non_regular_checkpoint_files_are_refused(ckpt, name, kind, words):
    f = os.path.join(ckpt, name)
    fifo_or_dev_zero(f, kind)
    with pytest.raises(CheckpointError, match=re.escape(f) + ": .* must be a regular file, but it is " + words):
        resume_unblocking(ckpt, f)


# ------------------------------------------------------------------ token files


@pytest.mark.parametrize(
    "packed, message",
    [
        (np.array([2, 5, -2, 1, 2, 3], np.int64), r"packed header gives document 1 the length -2, outside \[0, 3\]"),
        (
            np.array([1, 2**63 + 1, 7], np.uint64),
            r"packed header gives document 0 the length 9223372036854775809, outside \[0, 1\]",
        ),
        (np.array([2, 2**62, 2**62, 1, 2], np.int64), r"packed header gives document 0 the length 4611686018427387904"),
    ],
)
def test_packed_file_with_a_bad_length(tmp_path, packed, message):
    p = str(tmp_path / "packed.npy")
    np.save(p, packed)
    with pytest.raises(ValueError, match=re.escape(f"tokens: {p}: ") + message):
        open_tokens(p, "packed")


@pytest.mark.parametrize("kind, words", [("dir", "a directory"), ("fifo", "a FIFO"), ("zero", "a character device")])
def test_tokens_that_are_not_a_file(tmp_path, kind, words):
    p = str(tmp_path / "tokens.npy")
    if kind == "dir":
        os.mkdir(p)
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        os.symlink("/dev/zero", p)
    with pytest.raises(ValueError, match=re.escape(f"tokens: {p} is {words}")):
        open_tokens(p)
    cfg = parse_config({"model": "m", "output_dir": "o", "tokens": p}, source=str(tmp_path / "c.json"))
    with pytest.raises(ConfigError, match=re.escape(f"c.json: tokens: {p} is {words}")):
        open_data(cfg, 101, 103)


# ------------------------------------------------------------------ seeds


SEED = re.escape("seed must be a non-negative int, got -1")


@pytest.fixture(scope="module")
def plain(tiny):
    return cepe.load(tiny[0], n_threads=1)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, d: m.generate(np.array([[3, 4, 5]]), 2, temperature=1.0, seed=-1),
        lambda m, d: list(m.generate_stream(np.array([[3, 4, 5]]), 2, temperature=1.0, seed=-1)),
        lambda m, d: cepe.attach_encoder(m, seed=-1),
        lambda m, d: cepe.attach_encoder(m, encoder="random", init="normal", seed=-1),
        lambda m, d: cepe.Trainer(cepe.load(d, n_threads=1), total_steps=1, seed=-1),
        lambda m, d: parse_config({"model": "m", "output_dir": "o", "tokens": "t.npy", "seed": -1}),
    ],
    ids=["generate", "generate_stream", "attach_encoder", "attach_encoder_random", "Trainer", "train_config"],
)
def test_seed_is_checked_the_same_everywhere(plain, cepe_dir, call):
    with pytest.raises(ValueError, match=SEED):
        call(plain, cepe_dir)
