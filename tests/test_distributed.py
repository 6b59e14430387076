"""Data-parallel training on torch.distributed (cepe.distributed): on this machine's CPUs, gloo,
2 processes started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), tiny
random CEPE models from cepe.testing.reference.

Reduction order (cepe.distributed): each rank adds its grad_accum micro-batches' gradients in
order, each weighted 1 / (grad_accum * world_size); gloo's all-reduce sums the two buffers and
gives both ranks the same sum. One process with the whole batch forms the same sums in another
order, so losses and weights agree to rounding (1e-6 relative), and the ranks agree bit for bit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_config, write_config
from distributed_worker import TRAINER, global_batch, weight_digests

import cepe
import cepe.distributed as cd
from cepe.errors import ConfigError
from cepe.testing.reference import make_reference
from cepe.train_run import load_config, run

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
DEC_V = 101


@pytest.fixture(scope="module")
def cepe_dir(tmp_path_factory):
    return make_reference(seed=7).save(str(tmp_path_factory.mktemp("dist_model")))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist_data") / "stream.npy"
    np.save(path, np.random.default_rng(0).integers(3, DEC_V, size=6000).astype(np.int32))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int = 2, timeout_s: int = 60) -> list[subprocess.Popen]:
    """`world` processes of `argv`, with the environment torchrun gives its workers."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "CEPE_DIST_TIMEOUT": str(timeout_s),
        }
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def check_ok(results) -> None:
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{err[-3000:]}"


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def train_config(path, cepe_dir, tokens, out, **kw) -> str:
    return write_config(path, run_config(cepe_dir, tokens, out, **{"grad_accum": 1, **kw}))


def cli(config: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cepe", "train", "--config", config, "--json", *extra]


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trained(out) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    ckpt = os.path.join(out, "checkpoint")
    name = "head.safetensors" if os.path.exists(os.path.join(ckpt, "head.safetensors")) else "model.safetensors"
    return load_file(os.path.join(ckpt, name))


# ------------------------------------------------------------------ the buffer


def test_gradient_buffer_is_shared_without_a_copy(cepe_dir):
    """grad_buffer and grad_dlpack alias the core's buffer (torch.from_numpy, torch.from_dlpack),
    and zero_grad + compute_gradients + apply_update is step(): an in-place edit of the buffer
    between the two is what the update reads."""
    batch = global_batch(0, 4)
    a = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn+encoder", **TRAINER)
    b = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn+encoder", **TRAINER)
    ref = a.step(batch)

    b.zero_grad()
    losses = b.compute_gradients(batch, scale=0.5)  # half the gradient ...
    g = torch.from_numpy(b.grad_buffer)
    d = torch.from_dlpack(b.grad_dlpack())
    assert g.data_ptr() == d.data_ptr() == b.grad_buffer.ctypes.data
    assert d.dtype == torch.float32 and d.shape == (b.params.size,)
    g.mul_(2.0)  # ... doubled in place (exact): the update must see it
    np.testing.assert_array_equal(b._state.grads(), g.numpy())
    upd = b.apply_update()
    assert {**losses, **upd} == ref
    np.testing.assert_array_equal(a.params, b.params)
    del b  # the tensors keep the buffer alive
    assert float(d.abs().sum()) > 0 and torch.equal(d, g)


def test_rows_of_a_global_batch(cepe_dir, tokens, tmp_path):
    """Rank r of W reads rows r*B/W .. of step k's global batch: a pure function of
    (seed, k, r, W) whose union over the ranks is the one-process batch."""
    from cepe.train_run import open_data

    cfg = load_config(train_config(tmp_path / "c.json", cepe_dir, tokens, tmp_path / "o", batch_size=8), world_size=2)
    data = open_data(cfg, DEC_V, 103)
    for step in (0, 3, 100):
        whole = data.batch(cfg, step)
        parts = [data.batch(cfg, step, r, 4) for r in range(4)]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        np.testing.assert_array_equal(data.batch(cfg, step, 1, 2)["input_ids"], whole["input_ids"][4:])


def test_config_splits_the_global_batch_over_the_ranks(cepe_dir, tokens, tmp_path):
    """batch_size is global; grad_accum counts each rank's micro-batches (the default follows the
    recipe's micro-batch per process); a batch that does not split is refused naming the key."""
    base = {"model": "m", "output_dir": "o", "tokens": "t.npy"}
    from cepe.train_run import parse_config

    assert parse_config(base, source="c.json", world_size=1).grad_accum == 128  # 256 rows of micro-batch 2
    assert parse_config(base, source="c.json", world_size=8).grad_accum == 16  # the reference's 8 GPUs
    with pytest.raises(ConfigError, match=r"grad_accum: batch_size \(6\) must split into world_size \(4\)"):
        parse_config({**base, "batch_size": 6, "grad_accum": 1}, source="c.json", world_size=4)


# ------------------------------------------------------------------ 2 processes


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_equal_one_process(cepe_dir, tmp_path, accum):
    """2 processes x 2 rows (in `accum` micro-batches each) = 1 process x 4 rows for 5 steps:
    losses and weights within 1e-6 (E2-LLM positions drawn per sequence, weight decay, warmup,
    clipping); every weight, trainable and frozen, bit-identical on both ranks."""
    steps, rows = 5, 4
    check_ok(
        wait_all(launch([sys.executable, WORKER, cepe_dir, str(tmp_path), str(steps), str(rows), str(accum), "cpu"]))
    )
    ranks = []
    for r in range(2):
        with open(tmp_path / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"]  # every bound weight, by SHA-256
    assert ranks[0]["losses"] == ranks[1]["losses"]
    p0, p1 = np.load(tmp_path / "params0.npy"), np.load(tmp_path / "params1.npy")
    np.testing.assert_array_equal(p0, p1)

    model = cepe.load(cepe_dir, n_threads=1)
    frozen = weight_digests(model)
    one = cepe.Trainer(model, "cross_attn+encoder", **TRAINER)
    losses = [one.step(global_batch(k, rows))["loss"] for k in range(steps)]
    np.testing.assert_allclose(ranks[0]["losses"], losses, rtol=1e-6, atol=0)
    for name, shape, off in one.layout:
        n = int(np.prod(shape))
        assert rel_err(p0[off : off + n], one.params[off : off + n]) < 1e-6, name
    trainable = set(one.trainable_names)
    for name, digest in frozen.items():  # frozen weights: as loaded, on every rank
        if name not in trainable:
            assert ranks[0]["weights"][name] == digest, name


def test_cli_two_ranks_and_resume(cepe_dir, tokens, tmp_path):
    """`cepe train --nproc 2` (torchrun) and `cepe train` under torchrun's environment: rank 0
    writes metrics.jsonl (world_size on each line) and the checkpoint, equal to one process's
    within 1e-6; a run stopped after 3 steps
    and resumed with the same world size continues exactly; resuming it in one process is refused."""
    one = train_config(tmp_path / "one.json", cepe_dir, tokens, tmp_path / "one", total_steps=6)
    run(load_config(one, world_size=1))
    two = train_config(tmp_path / "two.json", cepe_dir, tokens, tmp_path / "two", total_steps=6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([*cli(two), "--nproc", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["world_size"] == 2  # one summary: rank 0's
    part = train_config(tmp_path / "part.json", cepe_dir, tokens, tmp_path / "part", total_steps=6, save_every=3)
    res = wait_all(launch(cli(part, "--steps", "3")))
    check_ok(res)
    assert json.loads(res[0][1])["step"] == 3 and res[1][1] == ""  # rank 0 reports
    check_ok(wait_all(launch(cli(part, "--resume"))))

    a, b, c = read_log(tmp_path / "one"), read_log(tmp_path / "two"), read_log(tmp_path / "part")
    assert [r["step"] for r in b] == [r["step"] for r in c] == list(range(1, 7))
    assert {r["world_size"] for r in b} == {2} and {r["world_size"] for r in a} == {1}
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"])
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in b] == [r[key] for r in c], key  # resumed: bit for bit
    wa, wb, wc = trained(tmp_path / "one"), trained(tmp_path / "two"), trained(tmp_path / "part")
    for name in wa:
        assert rel_err(wb[name], wa[name]) < 1e-6, name
        np.testing.assert_array_equal(wc[name], wb[name], err_msg=name)

    # the 2-process checkpoint, continued by one process: refused, naming both world sizes
    with pytest.raises(ConfigError, match=r"world size 2, this run has world size 1.*--nproc 2"):
        run(load_config(part, world_size=1, resume=True, total_steps=8))


def test_killed_rank_fails_the_other_naming_it(cepe_dir, tokens, tmp_path):
    """Rank 1 killed mid-run: rank 0 stops within seconds (no hang) with an error naming rank 1."""
    cfg = train_config(tmp_path / "c.json", cepe_dir, tokens, tmp_path / "o", total_steps=100000)
    procs = launch(cli(cfg), timeout_s=30)
    log = tmp_path / "o" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    waited = time.monotonic() - t0
    procs[1].communicate()
    assert procs[0].returncode == 2, err[-2000:]
    assert "rank 0 of 2" in err and "rank(s) 1" in err, err[-2000:]
    assert waited < 30, waited


@pytest.mark.cuda
def test_one_gpu_through_the_same_path(cepe_dir, tmp_path):
    """World size 1 on a GPU through DataParallel (NCCL, the buffer through DLPack) gives the
    one-process CPU run's losses and weights to GPU rounding."""
    if not torch.cuda.is_available() or not cepe.backends()["cuda"].get("available"):
        pytest.skip("needs a CUDA GPU and a CUDA build of cepe")
    steps, rows = 3, 4
    check_ok(
        wait_all(launch([sys.executable, WORKER, cepe_dir, str(tmp_path), str(steps), str(rows), "1", "cuda"], world=1))
    )
    with open(tmp_path / "rank0.json") as f:
        gpu = json.load(f)
    one = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn+encoder", **TRAINER)
    losses = [one.step(global_batch(k, rows))["loss"] for k in range(steps)]
    np.testing.assert_allclose(gpu["losses"], losses, rtol=1e-4)
    assert rel_err(np.load(tmp_path / "params0.npy"), one.params) < 1e-3


def test_world_size_one_in_process_is_the_plain_step(cepe_dir, monkeypatch):
    """One rank (gloo, in this process) goes through the same path as many: its steps equal
    Trainer.step bit for bit; a trainer saved by a run of another world size is refused."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    ctx = cd.init("cpu", timeout_s=30)
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device) == (0, 1, "gloo", "cpu")
        a = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn+encoder", grad_accum=2, **TRAINER)
        b = cepe.Trainer(cepe.load(cepe_dir, n_threads=1), "cross_attn+encoder", grad_accum=2, **TRAINER)
        dp = cd.DataParallel(b, ctx)
        for k in range(2):
            assert dp.step(global_batch(k, 4)) == a.step(global_batch(k, 4))
        np.testing.assert_array_equal(a.params, b.params)
        assert b.world_size == 1 and b._state_dict()["world_size"] == 1
        a.world_size = 2  # as if resumed from a 2-process checkpoint
        with pytest.raises(cd.DistributedError, match="saved by a run of world size 2 at step 2.*resume with 2"):
            cd.DataParallel(a, ctx)
    finally:
        cd.shutdown()


def test_outside_a_launcher_init_says_how_to_start(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(cd.DistributedError, match="torchrun"):
        cd.init("cpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        cd.init("tpu")
