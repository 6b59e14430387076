"""RoPE frequency tables of every scaling variant (csrc/rope_freq.c via
cepe.rope) against transformers' rope init functions, an fp64 re-derivation
of the formulas, and the snapshot values of the spec (§5.1); plus the error
messages for malformed settings."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import cepe_c
from cepe.errors import ConfigError
from cepe.rope import RopeSettings, e2llm_scale_for_length, parse_rope, rope_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

# HF computes in float32, we in float64 rounded to float32: a few float32 ulps apart.
HF_RTOL = 1e-6
# Against an fp64 re-derivation only our final rounding to float32 remains.
F64_RTOL = 1e-7


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    # HF only warns about e.g. an explicit yarn factor that differs from the implicit one.
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity_warning()


def config_dict(params, head_dim=128, max_pos=2048, **extra):
    return dict(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=dict(params),
        **extra,
    )


def hf_frequencies(cfg, seq_len=None):
    """transformers' table for a config dict (its own validation/standardisation included)."""
    kw = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling")}
    hf = transformers.LlamaConfig(**kw, rope_parameters=dict(cfg["rope_parameters"]))
    rtype = cfg["rope_parameters"].get("rope_type", "default")
    fn = ROPE_INIT_FUNCTIONS.get(rtype, LlamaRotaryEmbedding.compute_default_rope_parameters)
    inv_freq, attention = fn(hf, device="cpu", seq_len=seq_len)
    return inv_freq.numpy().astype(np.float64), float(attention)


# ---------------------------------------------------------- fp64 re-derivation


def ref_base(theta, dim):
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def ref_dynamic(theta, dim, factor, L, seq_len):
    n = max(seq_len or 0, L)
    return ref_base(theta * (factor * n / L - (factor - 1)) ** (dim / (dim - 2)), dim)


def ref_yarn(theta, dim, factor, L, beta_fast=32.0, beta_slow=1.0, truncate=True):
    def corr(rot):
        return dim * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = corr(beta_fast), corr(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0, 1)
    w = ref_base(theta, dim)
    return w / factor * ramp + w * (1 - ramp)


def ref_llama3(theta, dim, factor, L, low, high):
    w = ref_base(theta, dim)
    wl = 2 * math.pi / w
    smooth = (L / wl - low) / (high - low)
    out = np.where(wl > L / low, w / factor, w)
    mid = (wl >= L / high) & (wl <= L / low)
    return np.where(mid, (1 - smooth) * w / factor + smooth * w, out)


def ref_yarn_mscale(s, m=1.0):
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


def check(cfg, seq_len, ref=None, ref_magnitude=None):
    ours, magnitude = rope_frequencies(cfg, seq_len)
    hf, hf_magnitude = hf_frequencies(cfg, seq_len)
    assert ours.dtype == np.float32 and ours.shape == hf.shape
    np.testing.assert_allclose(ours, hf, rtol=HF_RTOL, atol=0)
    assert magnitude == pytest.approx(hf_magnitude, rel=1e-7)
    if ref is not None:
        np.testing.assert_allclose(ours, ref, rtol=F64_RTOL, atol=0)
    if ref_magnitude is not None:
        assert magnitude == pytest.approx(ref_magnitude, rel=1e-7)
    return ours, magnitude


# -------------------------------------------------------------------- variants


@pytest.mark.parametrize(
    "theta, head_dim",
    [(10000.0, 128), (500000.0, 64), (531.0, 12), (1e6, 256)],
)
def test_default(theta, head_dim):
    cfg = config_dict({"rope_type": "default", "rope_theta": theta}, head_dim=head_dim)
    check(cfg, None, ref_base(theta, head_dim), 1.0)


def test_default_partial_rotary_equals_hf_linear_factor_one():
    """Llama's own default ignores partial_rotary_factor; the generic rule (as
    linear with factor 1) rotates int(head_dim * prf) dims."""
    ours, m = rope_frequencies(config_dict({"rope_theta": 1e4, "partial_rotary_factor": 0.5}))
    hf, _ = hf_frequencies(
        config_dict({"rope_type": "linear", "rope_theta": 1e4, "factor": 1.0, "partial_rotary_factor": 0.5})
    )
    assert ours.shape == (32,)
    np.testing.assert_allclose(ours, hf, rtol=HF_RTOL)
    np.testing.assert_allclose(ours, ref_base(1e4, 64), rtol=F64_RTOL)


@pytest.mark.parametrize("factor, prf, theta", [(2.0, 1.0, 1e4), (10, 1.0, 1e4), (20.0, 1.0, 5e5), (4.0, 0.5, 1e4)])
def test_linear(factor, prf, theta):
    cfg = config_dict({"rope_type": "linear", "rope_theta": theta, "factor": factor, "partial_rotary_factor": prf})
    check(cfg, None, ref_base(theta, int(128 * prf)) / factor, 1.0)


@pytest.mark.parametrize(
    "factor, seq_len, prf, theta",
    [
        (10.0, 16384, 1.0, 1e4),  # above L: larger base
        (10.0, 1024, 1.0, 1e4),  # below L: the plain table
        (10.0, 2048, 1.0, 1e4),  # at L: still plain
        (10.0, None, 1.0, 1e4),  # no length yet (HF's init): plain
        (2.0, 5000, 0.5, 5e5),
        (4.0, 2049, 0.25, 1e4),
    ],
)
def test_dynamic(factor, seq_len, prf, theta):
    dim = int(128 * prf)
    cfg = config_dict({"rope_type": "dynamic", "rope_theta": theta, "factor": factor, "partial_rotary_factor": prf})
    ours, _ = check(cfg, seq_len, ref_dynamic(theta, dim, factor, 2048, seq_len), 1.0)
    if seq_len is None or seq_len <= 2048:
        np.testing.assert_allclose(ours, ref_base(theta, dim), rtol=F64_RTOL)


def test_dynamic_measures_against_max_position_embeddings():
    """HF's dynamic NTK ignores original_max_position_embeddings: L is max_position_embeddings."""
    cfg = config_dict(
        {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 1024},
        max_pos=4096,
    )
    assert parse_rope(cfg).original_max_position_embeddings == 4096
    check(cfg, 3000, ref_base(1e4, 128), 1.0)  # 3000 < 4096: unchanged
    check(cfg, 8192, ref_dynamic(1e4, 128, 2.0, 4096, 8192), 1.0)


@pytest.mark.parametrize(
    "params, max_pos, prf, expect_magnitude",
    [
        ({"factor": 10.0}, 2048, 1.0, ref_yarn_mscale(10.0)),
        ({"factor": 4.0, "truncate": False}, 8192, 1.0, ref_yarn_mscale(4.0)),
        ({"factor": 10.0, "attention_factor": 0.5}, 2048, 1.0, 0.5),
        (
            {"factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5},
            2048,
            1.0,
            ref_yarn_mscale(8, 1) / ref_yarn_mscale(8, 0.5),
        ),
        ({"factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707}, 2048, 1.0, 1.0),  # DeepSeek: ratio 1
        ({"factor": 8.0, "mscale": 1.0}, 2048, 1.0, ref_yarn_mscale(8.0)),  # mscale alone is ignored
        ({"factor": None}, 16384, 1.0, ref_yarn_mscale(8.0)),  # implicit: 16384 / 2048
        ({"factor": 4.0, "beta_fast": 1000.0}, 2048, 1.0, ref_yarn_mscale(4.0)),
        ({"factor": 4.0, "beta_fast": 16, "beta_slow": 2}, 2048, 0.5, ref_yarn_mscale(4.0)),
        ({"factor": 2.0, "beta_fast": 0, "beta_slow": 0}, 2048, 0.75, ref_yarn_mscale(2.0)),  # 0 = defaults, as HF
    ],
)
def test_yarn(params, max_pos, prf, expect_magnitude):
    L = 2048
    cfg = config_dict(
        {
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "original_max_position_embeddings": L,
            "partial_rotary_factor": prf,
            **params,
        },
        max_pos=max_pos,
    )
    s = params["factor"] or max_pos / L
    ref = ref_yarn(
        1e4,
        int(128 * prf),
        s,
        L,
        params.get("beta_fast") or 32.0,
        params.get("beta_slow") or 1.0,
        params.get("truncate", True),
    )
    ours, _ = check(cfg, None, ref, expect_magnitude)
    base = ref_base(1e4, int(128 * prf))  # every pair lies between interpolation and extrapolation
    assert np.all(ours <= base * (1 + 1e-6)) and np.all(ours >= base / s * (1 - 1e-6))


def test_yarn_truncate_changes_the_ramp():
    common = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 2048}
    a, _ = rope_frequencies(config_dict(common))
    b, _ = rope_frequencies(config_dict({**common, "truncate": False}))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "factor, low, high, L, theta, head_dim, prf",
    [
        (8.0, 1.0, 4.0, 8192, 500000.0, 128, 1.0),  # Llama 3.1
        (10.0, 1.0, 4.0, 2048, 10000.0, 128, 1.0),
        (4.0, 2.0, 8.0, 4096, 10000.0, 64, 1.0),
        (32.0, 1.0, 4.0, 8192, 500000.0, 64, 1.0),  # Llama 3.2
        (8.0, 1.0, 4.0, 8192, 500000.0, 128, 0.5),
    ],
)
def test_llama3(factor, low, high, L, theta, head_dim, prf):
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": L,
        "partial_rotary_factor": prf,
    }
    cfg = config_dict(params, head_dim=head_dim, max_pos=L * 16)
    check(cfg, None, ref_llama3(theta, int(head_dim * prf), factor, L, low, high), 1.0)


def longrope_params(**kw):
    return {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "short_factor": [2.0] * 64,
        "long_factor": [float(i) for i in range(1, 65)],
        "original_max_position_embeddings": 2048,
        **kw,
    }


@pytest.mark.parametrize(
    "kw, seq_len, use_long, magnitude",
    [
        ({"factor": 1.0}, None, False, 1.0),
        ({"factor": 10.0}, 4096, True, math.sqrt(1 + math.log(10) / math.log(2048))),
        ({"factor": 10.0}, 2048, False, math.sqrt(1 + math.log(10) / math.log(2048))),  # at L: short
        ({"factor": 10.0}, 2049, True, math.sqrt(1 + math.log(10) / math.log(2048))),
        ({"factor": 2.0, "attention_factor": 1.5}, 100, False, 1.5),
    ],
)
def test_longrope(kw, seq_len, use_long, magnitude):
    params = longrope_params(**kw)
    ref = ref_base(1e4, 128) / np.array(params["long_factor" if use_long else "short_factor"])
    check(config_dict(params, max_pos=2048 * 16), seq_len, ref, magnitude)


def test_longrope_phi3_window_and_implicit_factor():
    """Phi-3: no factor, a top-level original_max_position_embeddings that wins
    over the rope dict; the factor is max_position_embeddings / original."""
    params = longrope_params()
    params["original_max_position_embeddings"] = 999  # overridden by the top-level key
    params.pop("rope_theta")
    cfg = config_dict(params, max_pos=131072, original_max_position_embeddings=4096, rope_theta=1e4)
    assert parse_rope(cfg).original_max_position_embeddings == 4096
    expect = math.sqrt(1 + math.log(32) / math.log(4096))
    check(cfg, 4096, ref_base(1e4, 128) / 2.0, expect)
    check(cfg, 5000, ref_base(1e4, 128) / np.arange(1, 65), expect)


def test_longrope_partial_rotary():
    params = longrope_params(factor=4.0, partial_rotary_factor=0.5)
    params["short_factor"], params["long_factor"] = [1.5] * 32, [float(i) for i in range(2, 34)]
    check(config_dict(params), 4096, ref_base(1e4, 64) / np.arange(2, 34))


def test_spec_snapshots():
    """The values in the spec §5.1 (transformers' own rope tests, d=128, base 1e4, L=2048)."""
    inv, _ = rope_frequencies(config_dict({"rope_theta": 1e4}))
    assert inv[1] == pytest.approx(8.6596e-01, rel=1e-4) and inv[17] == pytest.approx(8.6596e-02, rel=1e-4)
    dyn, _ = rope_frequencies(config_dict({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 10.0}), 16384)
    assert dyn[1] == pytest.approx(8.0931e-01, rel=1e-4) and dyn[-1] == pytest.approx(1.6265e-06, rel=1e-4)
    yarn, m = rope_frequencies(config_dict({"rope_type": "yarn", "rope_theta": 1e4, "factor": 10.0}))
    np.testing.assert_allclose(yarn[:17], inv[:17], rtol=1e-6)
    np.testing.assert_allclose(yarn[17:21], [8.3479e-02, 6.9590e-02, 5.7925e-02, 4.8136e-02], rtol=1e-4)
    assert yarn[40] == pytest.approx(4.3007e-04, rel=1e-4)
    np.testing.assert_allclose(yarn[41:], inv[41:] / 10, rtol=1e-6)
    assert m == pytest.approx(0.1 * math.log(10) + 1, rel=1e-7)
    llama3_params = {
        "rope_type": "llama3",
        "rope_theta": 1e4,
        "factor": 10.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
    }
    llama3, _ = rope_frequencies(config_dict(llama3_params, max_pos=4096))
    np.testing.assert_allclose(llama3[:31], inv[:31], rtol=1e-6)
    expected = [1.0730e-02, 7.7785e-03, 5.6009e-03, 3.9991e-03, 2.8248e-03, 1.9675e-03, 1.3449e-03]
    expected += [8.9549e-04, 5.7363e-04, 3.4539e-04, 2.7384e-04]
    np.testing.assert_allclose(llama3[31:42], expected, rtol=1e-4)
    for f, mag in ((2, 1.044466), (10, 1.141049), (20, 1.180213)):
        _, m = rope_frequencies(config_dict(longrope_params(factor=float(f))))
        assert m == pytest.approx(mag, rel=1e-6)


# ------------------------------------------------------------------- parsing


def test_transformers4_style_config():
    """4.x: rope_scaling with the old key `type` plus a top-level rope_theta."""
    cfg = config_dict({}, max_pos=4096)
    del cfg["rope_parameters"]
    cfg.update(rope_theta=5e5, rope_scaling={"type": "dynamic", "factor": 2.0})
    s = parse_rope(cfg)
    assert (s.rope_type, s.rope_theta, s.factor) == ("dynamic", 5e5, 2.0)
    ours, _ = rope_frequencies(s, 10000)
    np.testing.assert_allclose(ours, ref_dynamic(5e5, 128, 2.0, 4096, 10000), rtol=F64_RTOL)
    cfg["rope_scaling"] = None  # null scaling: the default table
    assert parse_rope(cfg).rope_type == "default"


def test_rope_scaling_wins_over_rope_parameters():
    cfg = config_dict({"rope_type": "default", "rope_theta": 1e4})
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 3.0}
    s = parse_rope(cfg)
    assert (s.rope_type, s.factor, s.rope_theta) == ("linear", 3.0, 1e4)


def test_override_replaces_checkpoint_scaling_but_keeps_theta():
    cfg = config_dict({"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "partial_rotary_factor": 0.5})
    s = parse_rope(cfg, override={"rope_type": "linear", "factor": 8})
    assert (s.rope_type, s.factor, s.rope_theta, s.rotary_dim) == ("linear", 8.0, 5e5, 64)
    assert s.beta_fast is None and s.attention_factor is None
    s = parse_rope(cfg, override={"rope_type": "default", "rope_theta": 1e4})
    assert (s.rope_type, s.rope_theta) == ("default", 1e4)
    inv, m = rope_frequencies(s)
    np.testing.assert_allclose(inv, ref_base(1e4, 64), rtol=F64_RTOL)


def test_settings_and_layout():
    s = parse_rope(config_dict({"rope_theta": 1e4}))
    assert isinstance(s, RopeSettings) and s.layout == "half" and not s.length_dependent
    assert parse_rope(config_dict({"rope_theta": 1e4}), layout="interleaved").layout == "interleaved"
    assert parse_rope(config_dict(longrope_params())).length_dependent
    with pytest.raises(ConfigError, match="layout must be one of half, interleaved"):
        parse_rope(config_dict({}), layout="gptj")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.factor = 2.0  # type: ignore[misc]
    core = s.to_core()
    assert core["rope_type"] == "default" and core["rotary_dim"] == 128
    inv, m = cepe_c.rope_frequencies(core, 0)
    np.testing.assert_array_equal(inv, rope_frequencies(s)[0])


def test_e2llm_scale_for_length():
    assert e2llm_scale_for_length(8192, 4096) == {"rope_type": "linear", "factor": 2.0}
    assert e2llm_scale_for_length(65536, 4096) == {"rope_type": "linear", "factor": 16.0}
    assert e2llm_scale_for_length(10000, 4096)["factor"] == 3.0  # rounded up: covers the length
    assert e2llm_scale_for_length(100, 4096)["factor"] == 1.0
    s = parse_rope(config_dict({"rope_theta": 1e4}), override=e2llm_scale_for_length(32768, 4096))
    np.testing.assert_allclose(rope_frequencies(s)[0], ref_base(1e4, 128) / 8, rtol=F64_RTOL)
    with pytest.raises(ValueError, match="target_len must be an integer >= 1"):
        e2llm_scale_for_length(0, 4096)


def test_cepe_rope_init_unchanged():
    """The decoder's table (cepe_rope_init) is the default variant; a model
    still builds and the Python helper gives the same numbers as before."""
    inv, _ = rope_frequencies(config_dict({"rope_theta": 531.0}, head_dim=12))
    legacy = np.array([1.0 / 531.0 ** ((2.0 * i) / 12) for i in range(6)], dtype=np.float32)
    np.testing.assert_array_equal(inv, legacy)


# -------------------------------------------------------------------- errors


def bad(params=None, override=None, **cfg_kw):
    return parse_rope(config_dict(params or {}, **cfg_kw), override=override)


@pytest.mark.parametrize(
    "params, override, exc, message",
    [
        (
            {"rope_type": "linear", "rope_theta": 1e4},
            None,
            ConfigError,
            "rope_parameters.factor is required for rope_type 'linear'",
        ),
        ({}, {"rope_type": "dynamic"}, ConfigError, "rope_scaling.factor is required for rope_type 'dynamic'"),
        ({}, {"rope_type": "yarn"}, ConfigError, "rope_scaling.factor is required for rope_type 'yarn'"),
        ({}, {"rope_type": "linear", "factor": 0.5}, ConfigError, "rope_scaling.factor must be >= 1, got 0.5"),
        (
            {"rope_type": "llama3", "factor": 0.25, "low_freq_factor": 1, "high_freq_factor": 4},
            None,
            ConfigError,
            "config.json: rope_parameters.factor must be >= 1, got 0.25",
        ),
        ({}, {"rope_type": "linear", "factor": "two"}, ConfigError, "rope_scaling.factor must be a number, got 'two'"),
        ({}, {"rope_type": "linear", "factor": True}, ConfigError, "rope_scaling.factor must be a number, got True"),
        (
            {},
            {"rope_type": "linear", "factor": float("nan")},
            ConfigError,
            "rope_scaling.factor must be a finite number",
        ),
        (
            {},
            {"rope_type": "linear", "factor": float("inf")},
            ConfigError,
            "rope_scaling.factor must be a finite number",
        ),
        (
            {},
            {"rope_type": "yarn", "factor": 2.0, "beta_fast": "x"},
            ConfigError,
            "rope_scaling.beta_fast must be a number",
        ),
        (
            {},
            {"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 8},
            ConfigError,
            "rope_scaling.beta_fast must be >= beta_slow, got beta_fast=1 and beta_slow=8",
        ),
        (
            {},
            {"rope_type": "yarn", "factor": 2.0, "beta_slow": -1},
            ConfigError,
            "rope_scaling.beta_slow must be a finite number > 0, got -1",
        ),
        (
            {},
            {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0},
            ConfigError,
            "rope_scaling.attention_factor must be a finite number > 0, got 0",
        ),
        (
            {},
            {"rope_type": "yarn", "factor": 2.0, "truncate": "no"},
            ConfigError,
            "rope_scaling.truncate must be true or false",
        ),
        (
            {},
            {"rope_type": "yarn", "factor": 100.0, "mscale": -100.0, "mscale_all_dim": 1.0},
            ConfigError,
            "attention factor .* must be a finite number > 0",
        ),
        (
            {},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
            ConfigError,
            "rope_scaling.high_freq_factor is required for rope_type 'llama3'",
        ),
        (
            {},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
            ConfigError,
            "rope_scaling.high_freq_factor must be > low_freq_factor, got high_freq_factor=4 and low_freq_factor=4",
        ),
        (
            {},
            {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 64},
            ConfigError,
            r"rope_scaling.short_factor must have 64 entries \(rotary_dim/2\), got 3",
        ),
        (
            {},
            {"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 65},
            ConfigError,
            r"rope_scaling.long_factor must have 64 entries \(rotary_dim/2\), got 65",
        ),
        (
            {},
            {"rope_type": "longrope", "short_factor": [1.0] * 64},
            ConfigError,
            "rope_scaling.long_factor is required",
        ),
        (
            {},
            {"rope_type": "longrope", "short_factor": [1.0] * 64, "long_factor": ["a"] * 64},
            ConfigError,
            "rope_scaling.long_factor must be a list of numbers",
        ),
        (
            {},
            {"rope_type": "longrope", "short_factor": [1.0] * 63 + [0.0], "long_factor": [1.0] * 64},
            ConfigError,
            r"rope_scaling.short_factor\[63\] must be a finite number > 0, got 0",
        ),
        (
            {},
            {"rope_type": "longrope", "factor": 0.5, "short_factor": [1.0] * 64, "long_factor": [1.0] * 64},
            ConfigError,
            "rope_scaling.factor must be >= 1, got 0.5",
        ),
        ({"rope_type": "foo"}, None, ConfigError, "config.json: rope_parameters.rope_type: unknown value 'foo'"),
        ({}, {"type": "ntk"}, ConfigError, "rope_scaling.rope_type: unknown value 'ntk'"),
        (
            {},
            {"rope_type": "proportional"},
            NotImplementedError,
            "rope_scaling.rope_type 'proportional' is not supported",
        ),
        ({}, {"rope_type": "linear", "facter": 2.0}, ConfigError, "rope_scaling: unknown key.*'facter'"),
        ({}, [("rope_type", "linear")], ConfigError, "rope_scaling must be a dict"),
        ({"rope_theta": 1.0}, None, ConfigError, "rope_parameters.rope_theta must be > 1, got 1.0"),
        ({"rope_theta": "big"}, None, ConfigError, "rope_parameters.rope_theta must be a number, got 'big'"),
        ({"rope_theta": 1e4, "partial_rotary_factor": 1.5}, None, ConfigError, "partial_rotary_factor must be in"),
        (
            {"rope_theta": 1e4, "partial_rotary_factor": 0.01},
            None,
            ConfigError,
            r"gives rotary_dim int\(128 \* 0.01\) = 1",
        ),
        ({"full_attention": {"rope_type": "default"}}, None, NotImplementedError, "per-layer-type RoPE"),
    ],
)
def test_malformed_settings(params, override, exc, message):
    with pytest.raises(exc, match=message):
        bad(params, override)


def test_malformed_top_level():
    with pytest.raises(ConfigError, match="'rope_parameters' must be an object or null"):
        parse_rope({"hidden_size": 8, "num_attention_heads": 2, "rope_parameters": 3})
    with pytest.raises(ConfigError, match="missing required key 'hidden_size'"):
        parse_rope({"num_attention_heads": 2})
    with pytest.raises(ConfigError, match="original_max_position_embeddings must be an integer, got 'x'"):
        bad({}, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": "x"})
    with pytest.raises(ConfigError, match="config.json must hold a JSON object"):
        parse_rope([])


def test_helper_arguments():
    cfg = config_dict({"rope_theta": 1e4})
    with pytest.raises(ValueError, match="seq_len must be None or an integer"):
        rope_frequencies(cfg, -1)
    with pytest.raises(TypeError, match="expected a config dict or RopeSettings"):
        rope_frequencies("llama")


def test_binding_errors():
    """The raw binding names the key and rejects what it does not know."""
    base = {"rope_type": "linear", "rope_theta": 1e4, "head_dim": 64}
    with pytest.raises(ValueError, match="rope_scaling.factor is required for rope_type 'linear'"):
        cepe_c.rope_frequencies(base)
    with pytest.raises(ValueError, match="rope_scaling.factor must be >= 1, got 0.5"):
        cepe_c.rope_frequencies({**base, "factor": 0.5})
    with pytest.raises(ValueError, match="unknown key 'facter'"):
        cepe_c.rope_frequencies({**base, "facter": 2.0})
    with pytest.raises(ValueError, match="unknown rope_type 'ntk'"):
        cepe_c.rope_frequencies({**base, "rope_type": "ntk"})
    with pytest.raises(TypeError, match="factor must be a number or None"):
        cepe_c.rope_frequencies({**base, "factor": "2"})
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 1, got 0.5"):
        cepe_c.rope_frequencies({**base, "factor": 2.0, "rope_theta": 0.5})
    with pytest.raises(ValueError, match=r"rotary_dim \(head_dim \* partial_rotary_factor\) must be even"):
        cepe_c.rope_frequencies({**base, "factor": 2.0, "rotary_dim": 7})
    with pytest.raises(ValueError, match="seq_len must be >= 0, got -5"):
        cepe_c.rope_frequencies({**base, "factor": 2.0}, -5)
    with pytest.raises(ValueError, match=r"long_factor must have 32 entries \(rotary_dim/2\), got 2"):
        cepe_c.rope_frequencies(
            {"rope_type": "longrope", "head_dim": 64, "short_factor": [1.0] * 32, "long_factor": [1, 2]}
        )
    with pytest.raises(ValueError, match="'dynamic' needs rotary_dim >= 4"):
        cepe_c.rope_frequencies({"rope_type": "dynamic", "head_dim": 2, "factor": 2.0, "max_position_embeddings": 8})
    with pytest.raises(TypeError, match="must be a dict"):
        cepe_c.rope_frequencies([("rope_type", "default")])
    inv, m = cepe_c.rope_frequencies({"head_dim": 8})  # everything else defaults: plain RoPE, theta 1e4
    np.testing.assert_allclose(inv, ref_base(1e4, 8), rtol=F64_RTOL)
    assert m == 1.0
