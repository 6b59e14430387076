"""Training in the C core: the optimizer pieces against PyTorch
(AdamW, clip_grad_norm_, HF's cosine schedule), the CEPE backward against
torch autograd on the oracle of cepe.testing.reference, and cepe.Trainer
against a torch training loop from the same weights."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import cepe
import cepe_c

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from cepe.testing.reference import CepeReference, make_reference  # noqa: E402 (needs torch)


def rel(got, want) -> float:
    """max |got - want| relative to max |want|."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max(initial=0.0) / max(np.abs(want).max(initial=0.0), 1e-30))


# ------------------------------------------------------------------ optimizer


def hf_lrs(base_lr: float, warmup_ratio: float, total: int, n: int) -> list[float]:
    """The lr of optimizer steps 0..n-1 under HF Trainer's cosine schedule."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=base_lr)
    warmup = math.ceil(total * warmup_ratio)  # TrainingArguments.get_warmup_steps
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("ratio,total", [(0.0, 10), (0.04, 100), (0.1, 7), (0.5, 3), (0.3, 1), (1.0, 4)])
def test_schedule_matches_hf_cosine_with_warmup(ratio, total):
    want = hf_lrs(3e-4, ratio, total, total + 3)  # past the end too (HF clamps at 0)
    got = [cepe_c.lr_schedule(3e-4, k, ratio, total) for k in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    if ratio == 0.0:
        assert got[0] == 3e-4  # the first step uses the full lr


def test_schedule_rejects_bad_arguments():
    for args in [(1e-3, -1, 0.0, 10), (1e-3, 0, -0.1, 10), (1e-3, 0, 1.5, 10), (1e-3, 0, 0.0, 0)]:
        with pytest.raises(ValueError):
            cepe_c.lr_schedule(*args)


@pytest.mark.parametrize("wd,clip,ratio", [(0.0, 1.0, 0.0), (0.1, 0.5, 0.2), (0.01, 0.0, 0.1), (0.05, 1e3, 0.0)])
def test_adamw_clip_schedule_trajectory_equals_torch(wd, clip, ratio):
    """20 updates of tensors of several shapes, stored back to back in one
    flat buffer, against torch.optim.AdamW on the separate tensors with
    clip_grad_norm_ and LambdaLR(cosine): every step within 1e-6 relative."""
    rng = np.random.default_rng(7)
    shapes = [(13, 7), (5,), (3, 4, 2), (64,)]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = rng.standard_normal(sum(sizes)).astype(np.float32)
    tparams = []
    off = 0
    for s, n in zip(shapes, sizes, strict=True):
        tparams.append(torch.nn.Parameter(torch.tensor(flat[off : off + n].reshape(s))))
        off += n
    lr, total = 2e-2, 20
    opt = torch.optim.AdamW(tparams, lr=lr, betas=(0.9, 0.95), eps=1e-7, weight_decay=wd)
    sched = transformers.get_cosine_schedule_with_warmup(opt, math.ceil(total * ratio), total)
    m, v = np.zeros_like(flat), np.zeros_like(flat)
    for step in range(total):
        scale = 10.0 if step % 3 == 0 else 0.05  # both sides of the clip threshold
        g = (rng.standard_normal(flat.size) * scale).astype(np.float32)
        off = 0
        for p, n in zip(tparams, sizes, strict=True):
            p.grad = torch.tensor(g[off : off + n].reshape(p.shape))
            off += n
        want_norm = float(torch.nn.utils.clip_grad_norm_(tparams, clip)) if clip > 0 else None
        want_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        got_lr = cepe_c.lr_schedule(lr, step, ratio, total)
        assert got_lr == pytest.approx(want_lr, rel=1e-12)
        norm = cepe_c.adamw_step(
            flat, g, m, v, step=step + 1, lr=got_lr, beta1=0.9, beta2=0.95, eps=1e-7, weight_decay=wd, clip=clip
        )
        if want_norm is not None:
            assert norm == pytest.approx(want_norm, rel=1e-6)
        else:
            assert norm == pytest.approx(float(np.linalg.norm(g.astype(np.float64))), rel=1e-12)
        want = np.concatenate([p.detach().numpy().ravel() for p in tparams])
        assert rel(flat, want) <= 1e-6, f"step {step}: {rel(flat, want):.2e}"
        want_m = np.concatenate([opt.state[p]["exp_avg"].numpy().ravel() for p in tparams])
        want_v = np.concatenate([opt.state[p]["exp_avg_sq"].numpy().ravel() for p in tparams])
        assert rel(m, want_m) <= 1e-6 and rel(v, want_v) <= 1e-6


def test_grad_norm_is_independent_of_thread_count():
    """The norm is summed over fixed chunks in a fixed order, so a resumed run
    on another machine clips by the same bits."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal(1_000_003).astype(np.float32)
    norms = set()
    for nt in (1, 2, 3, 8):
        p, m, v = np.zeros_like(g), np.zeros_like(g), np.zeros_like(g)
        norms.add(cepe_c.adamw_step(p, g.copy(), m, v, step=1, lr=1e-3, clip=0.0, n_threads=nt))
    assert len(norms) == 1


def test_adamw_step_checks_its_buffers():
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="as many entries"):
        cepe_c.adamw_step(p, np.zeros(3, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), step=1, lr=1)
    with pytest.raises(TypeError, match="dtype"):
        cepe_c.adamw_step(p, np.zeros(4), np.zeros(4, np.float32), np.zeros(4, np.float32), step=1, lr=1)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        cepe_c.adamw_step(ro, p.copy(), p.copy(), p.copy(), step=1, lr=1)
    with pytest.raises(ValueError, match="step"):
        cepe_c.adamw_step(p, p.copy(), p.copy(), p.copy(), step=0, lr=1)


# ------------------------------------------------------- CEPE backward (piece 2)

F = torch.nn.functional


def named_params(ref: CepeReference) -> dict[str, torch.nn.Parameter]:
    """The oracle's parameters under their official checkpoint names."""
    out = {f"model.{k}": p for k, p in ref.lm.model.named_parameters()}
    out["lm_head.weight"] = ref.lm.lm_head.weight
    out.update({f"encoder.{k}": p for k, p in ref.encoder.named_parameters()})
    for i, mod in ref.cross.items():
        out.update({f"model.layers.{i}.cross_attn.{k}": p for k, p in mod.named_parameters()})
    return out


def is_trainable(name: str, trainable: str) -> bool:
    """Spec §6.1 (train.py's train_param)."""
    return (
        trainable == "all"
        or "cross_attn" in name
        or (trainable == "cross_attn+encoder" and name.startswith("encoder."))
    )


def kl_reference(logits, prob16, index, mode: str) -> torch.Tensor:
    """CEPED KL(teacher || student) over top-K tables, spec §6.4, in torch."""
    K = index.shape[-1]
    ps = torch.softmax(logits[:, -index.shape[1] :].reshape(-1, logits.shape[-1]), -1)
    q = ps.gather(1, torch.as_tensor(index.reshape(-1, K), dtype=torch.long))
    q = torch.cat([q, (1.0 - q.sum(-1, keepdim=True))], -1)
    p = torch.as_tensor(prob16.reshape(-1, K + 1).astype(np.float64), dtype=logits.dtype)
    if mode == "drop":
        p, q = p[:, :K], q[:, :K]
    else:
        delta = float(mode.split("_", 1)[1])
        p, q = (p + delta) / (1 + (K + 1) * delta), (q + delta) / (1 + (K + 1) * delta)
    return F.kl_div(q.log(), p, reduction="batchmean")


def torch_loss(
    ref: CepeReference, batch: dict, trainable: str, lm_cof=1.0, kl_cof=0.0, kl_mode="drop", scale=1.0, zero=True
):
    """The training loss with autograd through the oracle (gradients of
    scale * loss added to .grad, after zeroing them when `zero`); the
    encoder's output is detached when it does not train."""
    encode = CepeReference.encode.__wrapped__  # the oracle's methods, without their no_grad
    forward = CepeReference.forward.__wrapped__
    for name, p in named_params(ref).items():
        p.requires_grad_(is_trainable(name, trainable))
        if zero:
            p.grad = None
    E, emask = None, batch.get("encoder_attention_mask")
    if batch.get("encoder_input_ids") is not None:
        if trainable == "cross_attn":
            with torch.no_grad():
                E = encode(ref, batch["encoder_input_ids"], emask)
        else:
            E = encode(ref, batch["encoder_input_ids"], emask)
    logits = forward(ref, batch["input_ids"], E, emask, batch.get("attention_mask"))
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    labels = ids.clone() if batch.get("labels") is None else torch.as_tensor(batch["labels"], dtype=torch.long)
    if batch.get("labels") is None and batch.get("attention_mask") is not None:
        labels[torch.as_tensor(batch["attention_mask"]) == 0] = -100
    targets = labels[:, 1:].clone()
    if batch.get("attention_mask") is not None:  # a padded position predicts nothing
        targets[torch.as_tensor(batch["attention_mask"])[:, :-1] == 0] = -100
    V = logits.shape[-1]
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    loss = lm_cof * lm
    kl = torch.zeros(())
    if batch.get("distill_prob") is not None:
        kl = kl_reference(logits, batch["distill_prob"], batch["distill_index"], kl_mode)
        loss = loss + kl_cof * kl
    (scale * loss).backward()
    grads = {n: p.grad for n, p in named_params(ref).items() if p.grad is not None}
    return loss.item(), lm.item(), kl.item(), grads


def teacher_tables(rng, B, T_kl, V, K):
    """Random top-K teacher tables: fp16 probabilities (K + remainder) and distinct ids."""
    logits = rng.standard_normal((B, T_kl, V)) * 2
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1)[..., :K].astype(np.int32)
    top = np.take_along_axis(p, idx, -1)
    prob = np.concatenate([top, 1.0 - top.sum(-1, keepdims=True)], -1).astype(np.float16)
    return prob, idx


def make_batch(rng, ref: CepeReference, B=2, T=9, n_ctx=3, L=5, pad=True, kl_T=0, K=6):
    V, Ve = ref.dec_cfg.vocab_size, ref.enc_cfg.vocab_size
    batch = {
        "input_ids": rng.integers(3, V, size=(B, T)),
        "encoder_input_ids": rng.integers(3, Ve, size=(B, n_ctx, L)),
    }
    if pad:  # left-padded encoder chunks, an ignored label, a left-padded decoder row
        em = np.ones((B, n_ctx, L), np.int64)
        em[0, 1, :2] = 0
        em[-1, 0, :4] = 0
        batch["encoder_attention_mask"] = em
        labels = batch["input_ids"].copy()
        labels[0, 3] = -100
        am = np.ones((B, T), np.int64)
        am[-1, :2] = 0
        labels[-1, :2] = -100
        batch["labels"], batch["attention_mask"] = labels, am
    if kl_T:
        batch["distill_prob"], batch["distill_index"] = teacher_tables(rng, B, kl_T, V, K)
    return batch


@pytest.fixture(scope="module")
def cepe_dirs(tmp_path_factory):
    """Saved oracles: 3 decoder layers, cross-attention in the last 2 (layer 0
    has none, so the frozen backward stops at layer 1); a tied-embedding one."""
    out = {}
    for key, kw in {"base": {}, "tied": {"tie_word_embeddings": True}}.items():
        ref = make_reference(11, n_cross=2, **kw)
        out[key] = (ref.save(str(tmp_path_factory.mktemp(key))), ref)
    return out


def grad_check(trainer, ref, batch, trainable, tol=1e-3, **loss_kw):
    """C gradients of every trainable tensor against torch autograd in float64."""
    ref64 = ref.double()
    try:
        loss, lm, kl, want = torch_loss(ref64, batch, trainable, **loss_kw)
    finally:
        ref.float()
    got = trainer.gradients(batch)
    expected = {n for n in named_params(ref) if is_trainable(n, trainable)}
    if ref.dec_cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")  # tied: one tensor, embed_tokens
    assert set(got) == expected, "exactly the trainable tensors have gradients"
    assert set(want) >= expected
    errors = {name: rel(got[name], want[name].numpy()) for name in sorted(expected)}
    bad = {n: f"{e:.2e}" for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return loss, lm, kl


@pytest.mark.parametrize("trainable", ["cross_attn", "cross_attn+encoder", "all"])
def test_gradients_match_torch_autograd(cepe_dirs, trainable):
    path, ref = cepe_dirs["base"]
    model = cepe.load(path, n_threads=2)
    trainer = cepe.Trainer(model, trainable, total_steps=10)
    batch = make_batch(np.random.default_rng(0), ref)
    grad_check(trainer, ref, batch, trainable)


@pytest.mark.parametrize("kl_mode", ["drop", "smooth_1e-6", "smooth_0.01"])
def test_gradients_with_ceped_kl(cepe_dirs, kl_mode):
    """lm_loss_cof * CE + kl_loss_cof * KL over the last T_kl positions."""
    path, ref = cepe_dirs["base"]
    model = cepe.load(path, n_threads=2)
    trainer = cepe.Trainer(
        model, "cross_attn+encoder", total_steps=10, lm_loss_cof=0.7, kl_loss_cof=2.0, kl_mode=kl_mode
    )
    batch = make_batch(np.random.default_rng(1), ref, kl_T=6)
    loss, lm, kl = grad_check(trainer, ref, batch, "cross_attn+encoder", lm_cof=0.7, kl_cof=2.0, kl_mode=kl_mode)
    st = trainer._accumulate(batch)
    assert st["lm_loss"] == pytest.approx(lm, rel=1e-4)
    assert st["kl_loss"] == pytest.approx(kl, rel=1e-4)
    assert st["loss"] == pytest.approx(loss, rel=1e-4)


def test_gradients_all_with_tied_embeddings_and_gqa(cepe_dirs):
    path, ref = cepe_dirs["tied"]
    model = cepe.load(path, n_threads=2)
    trainer = cepe.Trainer(model, "all", total_steps=10)
    grad_check(trainer, ref, make_batch(np.random.default_rng(2), ref, pad=False), "all")


def test_no_context_cross_attn_only_reaches_nothing(cepe_dirs):
    """Without encoder input the cross-attention is skipped (spec §3): with the
    decoder frozen no trainable tensor gets a gradient, yet the loss is the
    base decoder's."""
    path, ref = cepe_dirs["base"]
    model = cepe.load(path, n_threads=2)
    trainer = cepe.Trainer(model, "cross_attn", total_steps=10)
    batch = {"input_ids": np.random.default_rng(3).integers(3, 101, size=(2, 8))}
    g = trainer.gradients(batch)
    assert all(not v.any() for v in g.values())
    loss, _, _, _ = torch_loss(ref, batch, "all")
    assert trainer._accumulate(batch)["loss"] == pytest.approx(loss, rel=1e-5)


# ------------------------------------------------------------ Trainer (piece 3)


def torch_trajectory(
    ref, batches, trainable, *, lr, wd, warmup_ratio, total, clip, grad_accum=1, betas=(0.9, 0.999), eps=1e-8, **loss_kw
):
    """HF Trainer's loop in torch: AdamW (no decay on norm weights), cosine
    schedule with warmup, clip_grad_norm_, grad_accum micro-batches."""
    params = named_params(ref)
    train = [p for n, p in params.items() if is_trainable(n, trainable)]
    if ref.dec_cfg.tie_word_embeddings:  # one tensor under two names
        train = list({id(p): p for p in train}.values())
    groups = [
        {"params": [p for p in train if p.ndim == 2], "weight_decay": wd},
        {"params": [p for p in train if p.ndim != 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    sched = transformers.get_cosine_schedule_with_warmup(opt, math.ceil(total * warmup_ratio), total)
    out = []
    for batch in batches:
        B = batch["input_ids"].shape[0]
        k = B // grad_accum
        loss = 0.0
        for i in range(grad_accum):
            mb = {key: v[i * k : (i + 1) * k] for key, v in batch.items()}
            loss += torch_loss(ref, mb, trainable, scale=1.0 / grad_accum, zero=i == 0, **loss_kw)[0] / grad_accum
        norm = float(torch.nn.utils.clip_grad_norm_(train, clip if clip > 0 else float("inf")))
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        out.append({"loss": loss, "grad_norm": norm, "lr": lr_now})
    return out


def checkpoint_arrays(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize(
    "trainable,kw",
    [
        ("cross_attn", dict(lr=2e-2, wd=0.0, warmup_ratio=0.0, clip=1.0)),
        ("cross_attn+encoder", dict(lr=1e-2, wd=0.1, warmup_ratio=0.2, clip=0.5, grad_accum=2)),
        ("all", dict(lr=5e-3, wd=0.01, warmup_ratio=0.1, clip=1.0, kl=True)),
    ],
)
def test_trainer_trajectory_equals_torch_adamw(cepe_dirs, trainable, kw):
    """10 steps of cepe.Trainer against torch AdamW from the same weights:
    losses within 1e-4, the trained Model's logits follow, and frozen weights
    stay bit-identical to the checkpoint."""
    path, ref0 = cepe_dirs["base"]
    ref = make_reference(11, n_cross=2)  # a fresh copy of the same weights to train in torch
    kl = kw.pop("kl", False)
    loss_kw = dict(lm_cof=0.5, kl_cof=2.0, kl_mode="smooth_0.001") if kl else {}
    rng = np.random.default_rng(5)
    batches = [make_batch(rng, ref, B=4, kl_T=4 if kl else 0) for _ in range(10)]
    model = cepe.load(path, n_threads=2)
    trainer = cepe.Trainer(
        model,
        trainable,
        lr=kw["lr"],
        weight_decay=kw["wd"],
        warmup_ratio=kw["warmup_ratio"],
        total_steps=10,
        clip=kw["clip"],
        grad_accum=kw.get("grad_accum", 1),
        **(dict(lm_loss_cof=0.5, kl_loss_cof=2.0, kl_mode="smooth_0.001") if kl else {}),
    )
    got = [trainer.step(b) for b in batches]
    want = torch_trajectory(ref, batches, trainable, total=10, **kw, **loss_kw)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g["loss"] - w["loss"]) <= 1e-4, f"step {i}: loss {g['loss']} vs torch {w['loss']}"
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-3), f"step {i}"
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12), f"step {i}"
    assert got[-1]["loss"] < got[0]["loss"]  # it learned something
    assert trainer.step_count == 10

    # the Model now runs on the trained weights
    probe = make_batch(np.random.default_rng(9), ref, B=2, pad=False)
    E = ref.encode(probe["encoder_input_ids"])
    want_logits = ref.forward(probe["input_ids"], E).numpy()
    got_logits = model.forward(probe["input_ids"], encoder_input_ids=probe["encoder_input_ids"])
    assert rel(got_logits, want_logits) <= 1e-3
    # trained tensors moved, frozen ones are the checkpoint's bits
    bound = cepe_c.train_weights(model._core)
    ckpt = checkpoint_arrays(path)
    trained = set(trainer.trainable_names)
    for name, arr in ckpt.items():
        if name in trained:
            assert not np.array_equal(bound[name], arr), f"{name} did not train"
            assert rel(bound[name], named_params(ref)[name].detach().numpy()) <= 1e-3, name
        elif name in bound:
            assert np.array_equal(bound[name], arr), f"frozen {name} changed"
    del ref0


# ------------------------------------------------ init, resume, E2-LLM (piece 4)


def test_init_modes_follow_the_spec(cepe_dirs):
    path, ref = cepe_dirs["base"]
    d_enc = ref.enc_cfg.hidden_size
    ckpt = checkpoint_arrays(path)
    probe = make_batch(np.random.default_rng(4), ref, B=2, pad=False)
    for init in ("copy", "zero", "normal"):
        model = cepe.load(path, n_threads=2)
        trainer = cepe.Trainer(model, "cross_attn", total_steps=1, init=init, seed=3)
        for i in (1, 2):
            pre = f"model.layers.{i}."
            t = {k: trainer.tensor(f"{pre}cross_attn.{k}.weight") for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
            assert np.array_equal(t["q_proj"], ckpt[f"{pre}self_attn.q_proj.weight"])
            assert np.array_equal(t["k_proj"], ckpt[f"{pre}self_attn.k_proj.weight"][:, :d_enc])
            assert np.array_equal(t["v_proj"], ckpt[f"{pre}self_attn.v_proj.weight"][:, :d_enc])
            norm = trainer.tensor(f"{pre}cross_attn.layernorm.weight")
            assert np.array_equal(norm, ckpt[f"{pre}post_attention_layernorm.weight"])
            o = t["o_proj"]
            if init == "copy":
                assert np.array_equal(o, ckpt[f"{pre}self_attn.o_proj.weight"])
            elif init == "zero":
                assert not o.any()
            else:  # kaiming normal: std sqrt(2 / fan_in)
                assert o.std() == pytest.approx(np.sqrt(2.0 / o.shape[1]), rel=0.15)
        with_ctx = model.forward(probe["input_ids"], encoder_input_ids=probe["encoder_input_ids"])
        without = model.forward(probe["input_ids"])
        if init == "zero":  # o_proj = 0: the model starts as exactly its base decoder
            assert np.array_equal(with_ctx, without)
        else:
            assert not np.allclose(with_ctx, without)
    again = cepe.Trainer(cepe.load(path, n_threads=2), "cross_attn", total_steps=1, init="normal", seed=3)
    assert np.array_equal(again.params, trainer.params), "init='normal' is reproducible for a seed"


def test_grad_accum_needs_divisible_rows(cepe_dirs):
    path, ref = cepe_dirs["base"]
    trainer = cepe.Trainer(cepe.load(path, n_threads=2), "cross_attn", total_steps=2, grad_accum=3)
    with pytest.raises(ValueError, match="grad_accum"):
        trainer.step(make_batch(np.random.default_rng(0), ref, B=4))


def test_save_resume_continues_bit_exactly(cepe_dirs, tmp_path):
    """10 uninterrupted steps == 5 steps, save, resume, 5 steps: the same
    losses, weights and moments bit for bit; the checkpoint loads as a model."""
    path, ref = cepe_dirs["base"]
    rng = np.random.default_rng(8)
    batches = [make_batch(rng, ref, B=2, kl_T=3) for _ in range(10)]
    kw = dict(
        lr=1e-2, weight_decay=0.05, warmup_ratio=0.3, total_steps=10, grad_accum=2, kl_loss_cof=1.5, kl_mode="drop"
    )
    a = cepe.Trainer(cepe.load(path, n_threads=2), "cross_attn+encoder", init="normal", seed=5, **kw)
    full = [a.step(b) for b in batches]
    b = cepe.Trainer(cepe.load(path, n_threads=2), "cross_attn+encoder", init="normal", seed=5, **kw)
    first = [b.step(x) for x in batches[:5]]
    ckpt = b.save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or .old directory left
    c = cepe.Trainer.resume(ckpt, n_threads=2)
    assert c.step_count == 5 and c.init == "normal"
    rest = [c.step(x) for x in batches[5:]]
    assert first + rest == full
    assert np.array_equal(c.params, a.params)
    assert np.array_equal(c.adam_m, a.adam_m) and np.array_equal(c.adam_v, a.adam_v)
    # the checkpoint is a model in the official layout: it loads and runs as the trainer's did at step 5
    probe = make_batch(np.random.default_rng(4), ref, B=1, pad=False)
    saved = cepe.load(ckpt, n_threads=2)
    want = cepe.Trainer.resume(ckpt, n_threads=2).model
    enc = {"encoder_input_ids": probe["encoder_input_ids"]}
    assert np.array_equal(saved.forward(probe["input_ids"], **enc), want.forward(probe["input_ids"], **enc))


def test_save_is_atomic(cepe_dirs, tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint as it was; a crash
    between the two renames leaves it as path.old, which resume() uses."""
    path, ref = cepe_dirs["base"]
    trainer = cepe.Trainer(cepe.load(path, n_threads=2), "cross_attn", total_steps=4, lr=1e-2)
    batch = make_batch(np.random.default_rng(0), ref)
    trainer.step(batch)
    ckpt = trainer.save(tmp_path / "ckpt")
    saved_params = trainer.params.copy()
    trainer.step(batch)

    import cepe.train as train_mod

    def boom(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(train_mod, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(ckpt)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert np.array_equal(cepe.Trainer.resume(ckpt, n_threads=2).params, saved_params)

    real_rename = os.rename
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        trainer.save(ckpt)
    monkeypatch.undo()
    assert not os.path.exists(ckpt) and os.path.exists(ckpt + ".old")
    resumed = cepe.Trainer.resume(ckpt, n_threads=2)
    assert resumed.step_count == 1 and np.array_equal(resumed.params, saved_params)


def forward_with_positions(ref: CepeReference, ids, E, emask, positions) -> torch.Tensor:
    """The oracle's decoder forward (CepeReference.forward) with explicit,
    possibly fractional RoPE positions; cos/sin in float64."""
    model = ref.lm.model
    x = torch.as_tensor(ids, dtype=torch.long)
    B, T = x.shape
    h = model.embed_tokens(x)
    inv = model.rotary_emb.inv_freq.double()
    ang = torch.as_tensor(positions, dtype=torch.float64)[..., None] * inv
    ang = torch.cat([ang, ang], -1)
    cos_sin = (ang.cos().to(h.dtype), ang.sin().to(h.dtype))
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    attn_mask = torch.where(~causal, 0.0, torch.finfo(torch.float32).min)[None, None].expand(B, 1, T, T)
    em = None if emask is None else torch.as_tensor(emask).reshape(B, -1)
    for i, layer in enumerate(model.layers):
        a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=attn_mask)
        h = h + a
        if E is not None and str(i) in ref.cross:
            h = h + ref.cross[str(i)](h, E, em)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return ref.lm.lm_head(model.norm(h))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_e2llm_positions_in_training(cepe_dirs, per_sequence):
    """With e2llm={...} the decoder's self-attention runs at E2-LLM positions
    (sinks kept, the rest shifted by t, all divided by g): gradients match
    autograd at those positions; the draw follows (seed, step)."""
    path, ref = cepe_dirs["base"]
    e2 = {"g_max": 4, "L": 16, "per_sequence": per_sequence}
    trainer = cepe.Trainer(cepe.load(path, n_threads=2), "all", total_steps=3, e2llm=e2, seed=7)
    batch = make_batch(np.random.default_rng(6), ref, B=3, T=12, pad=False)
    pos = trainer._positions(3, 12)
    for row in pos:  # (m + t) / g: sinks 0..3 unshifted, every later token shifted by one t
        g = 1.0 / row[1]
        assert g == round(g) and 1 <= g <= 4
        np.testing.assert_allclose(row[:4] * g, [0, 1, 2, 3], atol=1e-9)
        shift = row[4:] * g - np.arange(4, 12)
        np.testing.assert_allclose(shift, shift[0], atol=1e-9)
        assert 0 <= shift[0] <= max(0, g * 16 - 12)
    assert (len({tuple(r) for r in pos}) > 1) == per_sequence  # one draw per step, or one per row
    got = trainer.gradients(batch)
    ref64 = ref.double()
    try:
        params = named_params(ref64)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        E = CepeReference.encode.__wrapped__(ref64, batch["encoder_input_ids"])
        logits = forward_with_positions(ref64, batch["input_ids"], E, None, pos)
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        want = {n: p.grad.numpy().copy() for n, p in params.items()}
    finally:
        ref.float()
    errors = {n: rel(got[n], want[n]) for n in got}
    assert max(errors.values()) <= 1e-3, errors
    # a different step draws different positions; the same (seed, step) the same ones
    again = trainer._positions(3, 12)
    assert np.array_equal(again, pos)
    trainer.step(batch)
    assert not np.array_equal(trainer._positions(3, 12), pos)


def test_trainer_rejects_bad_arguments(cepe_dirs):
    path, ref = cepe_dirs["base"]
    model = cepe.load(path, n_threads=2)
    with pytest.raises(ValueError, match="trainable"):
        cepe.Trainer(model, "decoder", total_steps=1)
    with pytest.raises(ValueError, match="init"):
        cepe.Trainer(model, init="xavier", total_steps=1)
    with pytest.raises(ValueError, match="kl_mode"):
        cepe.Trainer(model, kl_mode="smooth_x", total_steps=1)
    with pytest.raises(ValueError, match="total_steps"):
        cepe.Trainer(model, total_steps=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        cepe.Trainer(model, total_steps=1, warmup_ratio=2)
    with pytest.raises(ValueError, match="e2llm"):
        cepe.Trainer(model, total_steps=1, e2llm={"gmax": 3})
    trainer = cepe.Trainer(model, total_steps=1)
    before = trainer.params.copy()
    with pytest.raises(ValueError, match="unknown batch keys"):
        trainer.step({"input_ids": np.ones((1, 4), np.int64), "lables": np.ones((1, 4), np.int64)})
    with pytest.raises(ValueError, match="out of range|outside"):
        trainer.step({"input_ids": np.full((1, 4), 500)})
    bad = make_batch(np.random.default_rng(0), ref, kl_T=2)
    bad["distill_index"][0, 0, 0] = 10_000
    with pytest.raises(ValueError, match="distill_index"):
        trainer.step(bad)
    assert np.array_equal(trainer.params, before) and trainer.step_count == 0


@pytest.mark.parametrize("kl_T", [6, 5])
def test_gradients_with_logits_in_chunks(cepe_dirs, kl_T):
    """Logits formed 3 positions at a time (chunk edges inside a row and
    inside the KL range) give the same losses and gradients."""
    path, ref = cepe_dirs["base"]
    V = ref.dec_cfg.vocab_size
    trainer = cepe.Trainer(
        cepe.load(path, n_threads=2), "all", total_steps=1, kl_loss_cof=1.0, kl_mode="drop", logit_floats=3 * V
    )
    batch = make_batch(np.random.default_rng(12), ref, kl_T=kl_T)
    loss, lm, kl = grad_check(trainer, ref, batch, "all", kl_cof=1.0, kl_mode="drop")
    st = trainer._accumulate(batch)
    assert st["loss"] == pytest.approx(loss, rel=1e-5) and st["kl_loss"] == pytest.approx(kl, rel=1e-5)


def test_train_loop_logs_jsonl(cepe_dirs, tmp_path):
    path, ref = cepe_dirs["base"]
    trainer = cepe.Trainer(cepe.load(path, n_threads=2), "cross_attn", total_steps=3, lr=1e-2)
    rng = np.random.default_rng(2)
    log = tmp_path / "metrics.jsonl"
    out = trainer.train((make_batch(rng, ref) for _ in range(10)), steps=3, log_path=str(log))
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and len(out) == 3
    assert all({"loss", "lm_loss", "kl_loss", "grad_norm", "lr", "seconds"} <= set(r) for r in recs)
    assert [r["loss"] for r in recs] == [o["loss"] for o in out]


def test_plain_llama_full_finetune_matches_hf(model_factory):
    """trainable="all" on a plain decoder (no CEPE parts), with GQA: the
    gradients equal transformers' own LlamaForCausalLM autograd."""
    path, hf = model_factory("tiny")
    trainer = cepe.Trainer(cepe.load(path, n_threads=2), "all", total_steps=1)
    ids = np.random.default_rng(0).integers(3, 97, size=(2, 11))
    got = trainer.gradients({"input_ids": ids})
    hf64 = hf.double()
    try:
        hf64.zero_grad()
        t = torch.as_tensor(ids)
        hf64(t, labels=t).loss.backward()
        want = {n: p.grad.numpy().copy() for n, p in hf64.named_parameters()}
    finally:
        hf.zero_grad()
        hf.float()  # the session's shared oracle, back as it was (fp32 -> fp64 -> fp32 is exact)
    assert set(got) == set(want)
    errors = {n: rel(got[n], want[n]) for n in got}
    assert max(errors.values()) <= 1e-3, errors
