"""Models whose weights stay in their stored format (GGUF blocks, F16, BF16) and are multiplied
natively on the CPU (csrc/quant/ through the model's matmuls), against the float32 model built
from the same weights widened exactly (cepe.load(..., dtype="float32"): the GGUF reader's
dequantization, bit-identical to the core's).

Error bounds. A product y = x · w with weights in format F differs from the float32 product of
the widened weights only by how x reaches the kernel:
  - Q4_0 / Q4_1 / Q8_0 (blocks of 32) and the K-quants (Q8_K, blocks of 256) quantize each
    activation block to int8 with scale d = max|x_B| / 127: |x_i - x^_i| <= d/2 (1 + 2^-13)
    (tests/test_quant.py derives it), so each product moves by at most
    eps_F * sum_B max|x_B| * sum_{i in B} |w_i| with eps_F = (1 + 2^-13) / 254.
  - BF16 with AVX512-BF16 rounds x to bf16: eps = 2^-8 relative to each |x_i|; F16, and BF16 on
    other paths, multiply x itself: eps = 0 up to fp32 summation order (~n u).
  - Many rows take dequantized tiles + sgemm (fp32 x, eps = 0), or for Q4_0 on AVX-512 the int8
    GEMM (the kernels' int8 activations, eps_F); the tests also force the kernels
    (cepe_qmatmul_sgemm_rows, cepe_qmatmul_gemm_rows) so that the bound is exercised there.
Through the network, to first order each of the P quantized products on a path perturbs its
output by at most eps_F times the magnitude of what it adds to the residual stream, and RMSNorm
rescales between layers, so in a network of unit-gain products (the test model's matrices are
scaled to std 1/sqrt(n_in), as a trained model's are) the logits move by at most about
P * eps_F * max|logits|. The
model tests assert |native - float32| <= P * eps_F * G * max|float32 logits| (+ 1e-4 for fp32
summation order), G the matrices' measured distance from unit gain (gain()); a wrong block
layout or scale is off by O(1) and fails them.

The default model (SmolLM2-135M-Instruct Q4_1, Q8_0 embeddings): perplexity on a fixed real
text (the stdlib's textwrap.py) within 0.5 % of the float32-dequantized model, on the prefill
path and with the kernels forced; greedy continuations of 10 prompts agree on most (the count
is printed and recorded in benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import textwrap

import numpy as np
import pytest
from conftest import build_hf_model

import cepe_c

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from test_gguf import make_bpe_vocab, write_gguf  # noqa: E402

import cepe  # noqa: E402
from cepe.pull import resolve  # noqa: E402
from cepe.qtensor import QTensor, convert, core_weights  # noqa: E402
from cepe.testing.quant_ctypes import QTensor as CQTensor  # noqa: E402  (the C struct, not cepe.qtensor's)
from cepe.testing.quant_ctypes import load_library  # noqa: E402

Q = gguf.GGMLQuantizationType
LIB = load_library()
EPS_Q8 = (1 + 2**-13) / 254
IDS = np.array([[5, 17, 200, 33, 91, 120, 7, 64, 250, 3, 44, 150, 11, 300, 42, 9, 77, 8]], dtype=np.int64)
LAYERS = 2
PRODUCTS = LAYERS * 7 + 1  # q, k, v, o, gate, up, down per layer, then lm_head


class kernels_forced:
    """Every product through the quantized kernels, however many rows (not the sgemm tiles,
    nor Q4_0's int8 GEMM, which multiplies the same int8 activations)."""

    def __enter__(self) -> None:
        self.prev = LIB.cepe_qmatmul_sgemm_rows(1 << 30), LIB.cepe_qmatmul_gemm_rows(1 << 30)

    def __exit__(self, *exc: object) -> None:
        LIB.cepe_qmatmul_sgemm_rows(self.prev[0])
        LIB.cepe_qmatmul_gemm_rows(self.prev[1])


class gemm_off:
    """Many rows through the dequantized tiles + sgemm rather than the int8 GEMM."""

    def __enter__(self) -> None:
        self.prev = LIB.cepe_qmatmul_gemm_rows(1 << 30)

    def __exit__(self, *exc: object) -> None:
        LIB.cepe_qmatmul_gemm_rows(self.prev)


def eps_of(fmt: str) -> float:
    if fmt in ("F32", "F16"):
        return 0.0
    if fmt == "BF16":
        return 2.0**-8 if LIB.cepe_quant_isa() == 2 and "avx512_bf16" in open("/proc/cpuinfo").read() else 0.0
    return EPS_Q8


@pytest.fixture(scope="module")
def vocab():
    return make_bpe_vocab()


@pytest.fixture(scope="module")
def hf(vocab):
    # rows of 256 values: every format, the K-quants included, fits every matrix
    model = build_hf_model(
        vocab_size=len(vocab["tokens"]),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    with torch.no_grad():  # unit-gain products (std 1/sqrt(n_in)), as in a trained model
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.mul_(1.0 / (p.std() * p.shape[1] ** 0.5))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory, hf, vocab):
    d = tmp_path_factory.mktemp("qmodel")
    return lambda fmt: write_gguf(str(d / f"m-{fmt}.gguf"), hf, vocab, Q[fmt])


FORMATS = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]


def gain(model: cepe.Model) -> float:
    """How far the model's matrices are from unit gain: the largest spectral norm over that of
    the unit-gain up_proj. 1 but for the K-quant files, whose ffn_down is random blocks
    (test_gguf.random_kquant: gguf cannot quantize to K-quants) with a large mean term."""
    w = core_weights(model._core)
    unit = np.linalg.norm(w["model.layers.0.mlp.up_proj.weight"], 2)
    worst = max(np.linalg.norm(w[f"model.layers.{i}.mlp.down_proj.weight"], 2) for i in range(LAYERS))
    return max(1.0, float(worst / unit))


@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_against_the_dequantized_float32_model(fmt, files):
    path = files(fmt)
    native = cepe.load(path, n_threads=2)
    held = {
        type(w).__name__ + (w.type_name if isinstance(w, QTensor) else "") for w in core_weights(native._core).values()
    }
    assert f"QTensor{fmt}" in held, "the weights stay in their stored format"
    f32 = cepe.load(path, n_threads=2, dtype="float32")
    ref = f32.forward(IDS)
    bound = PRODUCTS * eps_of(fmt) * gain(f32) * np.abs(ref).max() + 1e-4
    for forced in (False, True):
        if forced:
            with kernels_forced():
                got = native.forward(IDS)
        else:
            got = native.forward(IDS)
        err = np.abs(got - ref).max()
        assert err <= bound, f"{fmt} (kernels forced: {forced}): max |diff| {err:.3g} > bound {bound:.3g}"
    # decoding (one row a step) runs the kernels too
    a = native.generate(IDS, 6, eos_token_id=[])
    b = cepe.load(path, n_threads=2, dtype="float32").generate(IDS, 6, eos_token_id=[])
    assert a.shape == b.shape


@pytest.mark.parametrize("dtype,fmt", [("bfloat16", "BF16"), ("q8_0", "Q8_0")])
def test_convert_at_load(dtype, fmt, model_factory):
    """dtype= converts a float checkpoint's matrices at load; norms stay float32. The oracle is
    the float32 model of the converted weights, widened back."""
    path, _ = model_factory("qconv", hidden_size=64, intermediate_size=128)
    m = cepe.load(path, n_threads=1, dtype=dtype)
    w = core_weights(m._core)
    assert isinstance(w["model.layers.0.mlp.up_proj.weight"], QTensor)
    assert w["model.layers.0.mlp.up_proj.weight"].type_name == fmt
    assert isinstance(w["model.norm.weight"], np.ndarray) and w["model.norm.weight"].dtype == np.float32
    f32 = cepe.load(path, n_threads=1, dtype="float32")
    widened = {n: (convert(x, fmt).dequantize() if x.ndim == 2 else x) for n, x in core_weights(f32._core).items()}
    from cepe.build import build

    ref = build(f32.config, widened.items(), n_threads=1, device="cpu", path=path).forward(IDS % 97)
    got = m.forward(IDS % 97)
    bound = (2 * 7 + 1) * eps_of(fmt) * np.abs(ref).max() + 1e-4
    assert np.abs(got - ref).max() <= bound


def test_bf16_product_against_torch_bf16_matmul():
    """One BF16 product (cepe_qmatmul, as the model calls it) against torch's bf16 matmul of the
    same bf16 weights and bf16-rounded activations: torch rounds its fp32 sums to bf16
    (|error| <= 2^-9 |y|), ours keeps fp32; with fp32 activations (no AVX512-BF16) ours also
    differs by the activations' rounding, at most 2^-8 sum |x_i w_i|."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    q = convert(w, "BF16")
    assert isinstance(q, QTensor)

    rows = np.ascontiguousarray(q.rows)
    qt = CQTensor(30, 64, 256, rows.ctypes.data, rows.shape[1])
    out = np.zeros((5, 64), np.float32)
    assert LIB.cepe_qmatmul(out.ctypes.data, x.ctypes.data, ctypes.byref(qt), 5, 0, None, 0, 1) == 0
    tw = torch.from_numpy(q.dequantize()).to(torch.bfloat16)
    tx = torch.from_numpy(x).to(torch.bfloat16)
    want = (tx @ tw.T).float().numpy()
    mag = np.abs(x) @ np.abs(q.dequantize()).T
    assert np.all(np.abs(out - want) <= 2.0**-9 * np.abs(want) + 2.0**-8 * mag + 1e-5 * mag)


def test_bad_dtype_names_the_argument(files):
    with pytest.raises(ValueError, match="dtype"):
        cepe.load(files("Q8_0"), dtype="int4")
    with pytest.raises(NotImplementedError, match="dtype='q8_0'.*CPU only"):
        cepe.load(files("Q8_0"), dtype="q8_0", device="cpu-device-sim")


def test_device_widens_stored_formats_at_upload(files):
    """A device multiplies float32: the stored blocks are widened at upload, exactly as dtype='float32'."""
    path = files("Q4_1")
    sim = cepe.load(path, n_threads=1, device="cpu-device-sim").forward(IDS)
    ref = cepe.load(path, n_threads=1, dtype="float32").forward(IDS)
    np.testing.assert_allclose(sim, ref, rtol=0, atol=1e-5)


def test_save_reload_keeps_the_format(files, tmp_path):
    for fmt in ("Q4_K", "BF16"):
        m = cepe.load(files(fmt), n_threads=1)
        want = m.forward(IDS)
        saved = m.save(tmp_path / fmt)
        r = cepe.load(saved, n_threads=1)
        assert core_weights(r._core)["model.layers.0.mlp.down_proj.weight"].type_name == fmt
        assert np.array_equal(r.forward(IDS), want)


# ------------------------------------------------------------ the default model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "import numpy as np\n\nx = np.",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
    "The quick brown fox",
]


@pytest.fixture(scope="module")
def default_models():
    if not os.path.exists(resolve("smollm2-135m")):
        pytest.skip("the default model is not pulled")
    native = cepe.load("smollm2-135m", n_threads=2)
    assert core_weights(native._core)["model.layers.0.mlp.up_proj.weight"].type_name == "Q4_1"
    return native, cepe.load("smollm2-135m", n_threads=2, dtype="float32")


def test_default_model_perplexity_within_half_a_percent(default_models):
    native, f32 = default_models
    ids = np.array(native.tokenizer.encode(open(textwrap.__file__, encoding="utf-8").read())[:512])
    want = f32.perplexity(ids)
    assert abs(native.perplexity(ids) / want - 1) <= 0.005  # prefill: dequantized tiles
    with kernels_forced():  # what decoding computes: int8 activations
        got = native.perplexity(ids)
    print(f"perplexity: float32 {want:.4f}, Q4_1 kernels {got:.4f} ({100 * (got / want - 1):+.3f} %)")
    assert abs(got / want - 1) <= 0.005


def test_default_model_greedy_output_agrees_on_most_prompts(default_models):
    native, f32 = default_models
    same = 0
    for prompt in PROMPTS:
        ids = np.array([native.tokenizer.encode(prompt)])
        a = native.generate(ids, 16, eos_token_id=[])
        b = f32.generate(ids, 16, eos_token_id=[])
        same += int(np.array_equal(a, b))
    print(f"greedy: {same} of {len(PROMPTS)} prompts give the same 16 tokens")
    assert same >= 6  # most; 7 of 10 on this machine (AVX-512 VNNI), benchmarks/README.md


# ------------------------------------------------------------ training


@pytest.mark.parametrize("fmt", ["BF16", "Q8_0"])
def test_training_with_a_frozen_low_precision_decoder(fmt, tmp_path):
    """cepe.Trainer over a CEPE model whose decoder is held in fmt: the trainable cross-attention
    stays float32 (master weights, AdamW moments), the frozen products run in fmt and their input
    gradients through widened tiles. Oracle: the same Trainer over the float32 model of the
    widened weights. With the sgemm path (18 rows) the products are the same fp32 sums; with the
    kernels forced, or the int8 GEMM that many rows take for Q4_0 / Q4_1 / Q8_0 on AVX-512, the
    activations are rounded (eps_F, module docstring) and the gradients move to first order by at
    most the forward's bound, P * eps_F relative. BF16 on AVX512-BF16 runs the bf16 GEMM at 18 rows
    and for the input gradients at any row count: the forward rounds its activations (eps = 2^-8,
    P products) and each frozen product's input gradient rounds dout to bf16, perturbing it by at
    most 2^-8 relative to what it adds (P more products on the backward path), so to first order
    the gradients move by at most 2 P 2^-8 relative."""
    from test_train import make_batch, rel

    from cepe.build import build
    from cepe.testing.reference import make_reference

    ref = make_reference(11, n_cross=2, hidden_size=64, intermediate_size=128)
    path = ref.save(str(tmp_path / "m"))
    f32 = cepe.load(path, n_threads=2, dtype="float32")

    def frozen_decoder(name: str, w: np.ndarray) -> bool:
        return w.ndim == 2 and not name.startswith("encoder.") and ".cross_attn." not in name

    stored = {n: (convert(w, fmt) if frozen_decoder(n, w) else w) for n, w in core_weights(f32._core).items()}
    widened = {n: (w.dequantize() if isinstance(w, QTensor) else w) for n, w in stored.items()}
    low = build(f32.config, stored.items(), n_threads=2, device="cpu", path=path)
    oracle = build(f32.config, widened.items(), n_threads=2, device="cpu", path=path)
    t_low = cepe.Trainer(low, "cross_attn", total_steps=10)
    t_ref = cepe.Trainer(oracle, "cross_attn", total_steps=10)
    frozen = core_weights(low._core)["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(frozen, QTensor) and frozen.type_name == fmt, "the frozen decoder stays in its format"
    assert t_low.params.dtype == np.float32 and t_low.adam_m.dtype == np.float32
    batch = make_batch(np.random.default_rng(0), ref)
    want = t_ref.gradients(batch)
    with gemm_off():  # the sgemm path, not the int8 GEMM (Q4_0 / Q4_1 / Q8_0 on AVX-512)
        got = t_low.gradients(batch)
    assert set(got) == set(want)
    errors = {n: rel(got[n], want[n]) for n in want}
    products = 3 * 7 + 1
    rows = np.ascontiguousarray(frozen.rows)
    ct = CQTensor(frozen.qtype, frozen.shape[0], frozen.n_in, rows.ctypes.data, rows.shape[1])
    bf16_gemm = LIB.cepe_qmatmul_backward_uses_bf16_gemm(ctypes.byref(ct))
    assert bf16_gemm == (fmt == "BF16" and eps_of(fmt) > 0)
    bound = 2 * products * 2.0**-8 + 1e-4 if bf16_gemm else 1e-4
    assert max(errors.values()) <= bound, (errors, bound)
    bound = (2 if bf16_gemm else 1) * products * eps_of(fmt) + 1e-4
    for way in (kernels_forced(), contextlib.nullcontext()):  # int8 activations where the format has them
        with way:
            got = t_low.gradients(batch)
        errors = {n: rel(got[n], want[n]) for n in want}
        assert max(errors.values()) <= bound, (way, errors, bound)
    stats = t_low.step(batch)
    assert np.isfinite(stats["loss"])


# ------------------------------------------------------------ bad input


def test_stored_format_bad_input_names_the_fault(files, tmp_path):
    from cepe.safetensors_io import FORMATS_KEY, SafetensorsFile

    m = cepe.load(files("Q8_0"), n_threads=1)
    w = core_weights(m._core)["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(w, QTensor)
    core = cepe_c.Model(m.config.core_kwargs(), None, n_threads=1)
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=f"tensor {name}: .* bytes a row do not hold 256 values of Q8_0"):
        core.bind(name, np.ascontiguousarray(w.rows[:, :-2]), w.qtype, w.n_in)
    with pytest.raises(ValueError, match="unsupported weight type id 7"):
        core.bind(name, w.rows, 7, w.n_in)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(1, 256\), the config implies \(256,\)"):
        core.bind("model.norm.weight", np.zeros((1, 34 * 8), np.uint8), 8, 256)
    # a saved block format whose metadata is damaged
    saved = m.save(tmp_path / "saved")
    st = os.path.join(saved, "model.safetensors")
    blob = open(st, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + n].replace(b'\\"Q8_0\\", 256]', b'\\"Q8_0\\", 224]')
    assert header != blob[8 : 8 + n]
    with open(st, "wb") as f:
        f.write(blob[:8] + header + blob[8 + n :])
    with pytest.raises(cepe.CheckpointError, match="bytes a row do not hold 224 values of Q8_0"):
        SafetensorsFile(st)
    assert FORMATS_KEY in open(st, "rb").read(8 + n).decode("utf-8", "replace")
