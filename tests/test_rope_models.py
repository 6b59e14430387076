"""Every RoPE variant end to end: tiny random LLaMA models whose config carries
each rope type give transformers' logits, including inputs past the original
window (dynamic NTK growth, LongRoPE's long factors), generation across the
window, the interleaved pair layout, long positions against float64, and the
load-time override."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_hf_model, hf_greedy, hf_logits, random_ids

import cepe
import cepe_c
from cepe.model import Model

TOL = 1e-4
HALF = 6  # head_dim 12 (hidden 48 / 4 heads) -> 6 pairs

VARIANTS = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0}),
    "dynamic": dict(
        max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}
    ),
    "yarn": dict(
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        },
    ),
    "yarn_mscale": dict(
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 5000.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "truncate": False,
        },
    ),
    "llama3": dict(
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 50000.0,
        },
    ),
    "longrope": dict(
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "longrope",
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
        },
    ),
}


@pytest.fixture(params=sorted(VARIANTS))
def rope_model(request, model_factory):
    name = request.param
    path, hf = model_factory(f"rope_{name}", **VARIANTS[name])
    return name, path, hf


@pytest.mark.parametrize("T", [20, 80])  # below and above the original window of 32
def test_logits_match_transformers(rope_model, T):
    name, path, hf = rope_model
    model = cepe.load(path)
    assert model.config.rope.rope_type == VARIANTS[name]["rope_parameters"]["rope_type"]
    ids = random_ids(np.random.default_rng(T), (2, T))
    np.testing.assert_allclose(model.forward(ids), hf_logits(hf, ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_generation_across_the_window(name, model_factory):
    """The prompt fits the original window, generation runs past it: the table
    switches per step while cached keys keep their rotation, as in transformers."""
    path, hf = model_factory(f"rope_{name}", **VARIANTS[name])
    model = cepe.load(path)
    prompt = random_ids(np.random.default_rng(1), (1, 26))
    np.testing.assert_array_equal(model.generate(prompt, 16, eos_token_id=[]), hf_greedy(hf, prompt, 16))


def test_dynamic_state_is_per_request(model_factory):
    """transformers keeps the grown table on the module, so an unrelated later
    call depends on earlier ones; cepe keeps it per request (a KVCache)."""
    path, hf = model_factory("rope_dynamic", **VARIANTS["dynamic"])
    model = cepe.load(path)
    short = random_ids(np.random.default_rng(2), (1, 20))
    before = model.forward(short)
    model.forward(random_ids(np.random.default_rng(3), (1, 80)))
    np.testing.assert_array_equal(model.forward(short), before)


def test_override_at_load_equals_checkpoint_setting(tiny, model_factory):
    """cepe.load(rope_scaling=...) gives what a checkpoint with that setting gives."""
    path_linear, _ = model_factory("rope_linear", **VARIANTS["linear"])
    base_path, _ = tiny
    ids = random_ids(np.random.default_rng(4), (1, 40))
    # the same weights as the tiny model, with linear scaling asked for at load
    overridden = cepe.load(base_path, rope_scaling={"rope_type": "linear", "factor": 2.5})
    assert overridden.config.rope.rope_type == "linear"
    from conftest import BASE

    hf = build_hf_model(
        **{
            **{k: v for k, v in BASE.items()},
            "rope_parameters": {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0},
        }
    )
    np.testing.assert_allclose(overridden.forward(ids), hf_logits(hf, ids), atol=TOL, rtol=0)
    # and E2-LLM's inference rule picks g = L'/L
    rule = cepe.rope.e2llm_scale_for_length(8192, 4096)
    assert rule == {"rope_type": "linear", "factor": 2.0} or rule["factor"] == 2


@pytest.mark.parametrize(
    "override, exc, match",
    [
        ({"rope_type": "linear"}, cepe.ConfigError, "factor"),
        ({"rope_type": "linear", "factor": 0.5}, cepe.ConfigError, "factor must be >= 1"),
        ({"rope_type": "warp", "factor": 2.0}, cepe.ConfigError, "rope_type"),
        ({"rope_type": "linear", "factor": "x"}, cepe.ConfigError, "factor"),
        ({"rope_type": "linear", "factor": 2.0, "bogus": 1}, cepe.ConfigError, "unknown key"),
        ("linear", cepe.ConfigError, "rope_scaling must be a dict"),
    ],
)
def test_bad_override(tiny, override, exc, match):
    with pytest.raises(exc, match=match):
        cepe.load(tiny[0], rope_scaling=override)


def to_interleaved(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Undo HF's q/k row permutation (Meta / GGUF order): HF row r is Meta row 2r,
    HF row d/2 + r is Meta row 2r + 1, within each head."""
    w = w.reshape(n_heads, 2, head_dim // 2, -1)
    return np.ascontiguousarray(w.transpose(0, 2, 1, 3).reshape(n_heads * head_dim, -1))


def test_interleaved_layout_equals_rotate_half(tiny):
    """The same model with Meta-ordered q/k weights and the interleaved layout
    gives the HF checkpoint's logits: the layout belongs to the weights."""
    from cepe.safetensors_io import Checkpoint

    path, hf = tiny
    model = cepe.load(path)
    cfg = model.config
    kwargs = cfg.core_kwargs()
    kwargs["rope"] = {**kwargs["rope"], "layout": "interleaved"}
    ckpt = Checkpoint(path)

    def meta_ordered(core_kwargs: dict) -> Model:
        """A Model over the checkpoint's weights with q/k rows in Meta's (interleaved) order."""
        core = cepe_c.Model(core_kwargs, None, n_threads=1)
        for name in ckpt.names():
            w = np.asarray(ckpt.get(name))
            if name.endswith("q_proj.weight"):
                w = to_interleaved(w, cfg.num_attention_heads, cfg.head_dim)
            elif name.endswith("k_proj.weight"):
                w = to_interleaved(w, cfg.num_key_value_heads, cfg.head_dim)
            core.bind(name, np.ascontiguousarray(w))
        core.finalize()
        return Model(core, cfg, n_threads=1, path=path, device="cpu")

    meta = meta_ordered(kwargs)
    ids = random_ids(np.random.default_rng(5), (2, 30))
    np.testing.assert_allclose(meta.forward(ids), model.forward(ids), atol=1e-5, rtol=0)
    # and reading Meta-ordered weights as rotate-half is wrong (the failure this flag prevents)
    wrong = meta_ordered(cfg.core_kwargs()).forward(ids)
    assert np.abs(wrong - model.forward(ids)).max() > 1e-2


@pytest.mark.parametrize("start", [100_000, 1_000_000])
def test_long_positions_against_float64(tiny, start):
    """At positions 1e5..1e6 fp32 products lose phase; cepe computes angles in
    double. Reference: the same model in float64 with exact float64 RoPE."""
    path, hf = tiny
    model = cepe.load(path)
    ids = random_ids(np.random.default_rng(6), (1, 12))
    pos = np.arange(start, start + 12)[None]
    ref = hf.double().eval()
    rot = ref.model.rotary_emb
    d = hf.config.head_dim
    inv64 = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))

    def exact(x, position_ids):
        ang = position_ids[0].double().numpy()[:, None] * inv64[None, :]
        emb = np.concatenate([ang, ang], axis=-1)
        return (torch.as_tensor(np.cos(emb))[None], torch.as_tensor(np.sin(emb))[None])

    orig = rot.forward
    rot.forward = exact
    try:
        with torch.no_grad():
            want = ref(torch.as_tensor(ids), position_ids=torch.as_tensor(pos)).logits.numpy()
    finally:
        rot.forward = orig
        hf.float()
    got = model.forward(ids, position_ids=pos)
    # inv_freq is stored in fp32 (relative error <= 6e-8): the phase error may grow with the position
    tol = 1e-5 + 5e-12 * start * np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= tol, (err, tol)
    # fp32 angle products (what transformers does) lose more: cepe is at least as close
    fp32_err = np.abs(hf_logits(hf, ids, position_ids=pos) - want).max()
    assert err <= fp32_err, (err, fp32_err)


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_perplexity_in_slices_equals_one_forward(name, model_factory):
    """perplexity() feeds 256-token slices; length-dependent RoPE must still use
    the whole input's table, as one forward does."""
    path, _ = model_factory(f"rope_{name}", **VARIANTS[name])
    model = cepe.load(path)
    ids = random_ids(np.random.default_rng(7), (1, 600))
    logits = model.forward(ids).astype(np.float64)[0]
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    want = float(np.exp(-lp[np.arange(599), ids[0, 1:]].mean()))
    assert model.perplexity(ids) == pytest.approx(want, rel=1e-5)
