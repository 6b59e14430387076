"""cepe.testing: the pytest plugin's fixtures, its helpers, the example
experiment in examples/, and a pytest run of the plugin where torch cannot be
imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cepe
from cepe.testing import TINY_LLAMA, assert_generations_equal, assert_logits_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_llama_matches_transformers(tiny_llama):
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, TINY_LLAMA["vocab_size"], size=(2, 11))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits
    model = tiny_llama.load()
    assert_logits_close(model.forward(ids), want, atol=1e-4)
    with torch.no_grad():
        hf_gen = hf.generate(torch.as_tensor(ids[:1]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert_generations_equal(model.generate(ids[:1], 12, eos_token_id=[]), hf_gen[:, ids.shape[1] :])


def test_tiny_cepe_matches_the_reference(tiny_cepe, reference):
    ref = reference.load_reference(tiny_cepe.path)
    model = tiny_cepe.load()
    rng = np.random.default_rng(1)
    chunks = rng.integers(3, 101, size=(2, 3, 7))
    ids = rng.integers(3, 101, size=(2, 9))
    want = ref.forward(ids, ref.encode(chunks))
    got = model.forward(ids, encoder_input_ids=chunks)
    assert_logits_close(got, want, atol=1e-4)
    assert np.abs(got - model.forward(ids)).max() > 1e-2  # the context matters


@pytest.mark.cepe_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
def test_marker_changes_the_config(tiny_llama):
    assert tiny_llama.config["hidden_size"] == 32
    assert tiny_llama.load().config.hidden_size == 32


@pytest.mark.parametrize(
    "tiny_cepe",
    [{"num_cross_attn_layers": 1, "encoder": {"hidden_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2}}],
    indirect=True,
)
def test_indirect_parameter_changes_the_config(tiny_cepe):
    model = tiny_cepe.load()
    states = model.encode(np.full((1, 5), 7))
    assert states.shape == (5, 24)
    assert tiny_cepe.config["num_cross_attn_layers"] == 1


def test_unknown_config_key_is_refused(tmp_path):
    from cepe.testing import write_tiny_llama

    with pytest.raises(ValueError, match="hidden_sise"):
        write_tiny_llama(tmp_path, hidden_sise=3)


def test_default_model_loads_or_skips(default_model):
    assert isinstance(default_model, cepe.Model)


def test_assertions_name_where_results_part():
    a = np.zeros((2, 3, 5), np.float32)
    b = a.copy()
    b[1, 2, 4] = 1.0
    assert_logits_close(a, a + 5e-5)
    with pytest.raises(AssertionError, match=r"1 of 30 values .* worst at \(1, 2, 4\).*argmax there 0 vs 4"):
        assert_logits_close(a, b)
    with pytest.raises(AssertionError, match="shape"):
        assert_logits_close(a, b[0])
    with pytest.raises(AssertionError, match="non-finite"):
        assert_logits_close(a + np.nan, a)
    assert_generations_equal([1, 2, 3], np.array([[1, 2, 3]]))
    with pytest.raises(AssertionError, match=r"row 1 differs from step 2"):
        assert_generations_equal([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 7]])
    with pytest.raises(AssertionError, match=r"row 0 differs from step 2 .*lengths 2 and 3"):
        assert_generations_equal([1, 2], [1, 2, 3])


def test_example_experiment_passes():
    """examples/ holds experiments written as pytest files; they run as any test file."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "cepe.testing.plugin", os.path.join(ROOT, "examples")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout


def test_plugin_works_without_torch(tmp_path):
    """With torch unimportable, import cepe works, the NumPy fixtures run and `reference` skips."""
    (tmp_path / "test_no_torch.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def test_tiny(tiny_llama, tiny_cepe):
                import sys
                assert "torch" not in sys.modules or sys.modules["torch"] is None
                assert tiny_llama.load().forward(np.arange(3, 8)).shape == (5, 101)
                assert tiny_cepe.load().encode(np.full((1, 4), 5)).shape == (4, 40)

            def test_reference(reference):
                raise AssertionError("must be skipped without torch")
            """
        )
    )
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "import cepe, cepe.ops, cepe.testing, pytest; "
        "sys.exit(pytest.main(['-q', '-rs', '-p', 'cepe.testing.plugin', '-p', 'no:cacheprovider', "
        f"{str(tmp_path)!r}]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 passed, 1 skipped" in r.stdout
    assert "could not import 'torch'" in r.stdout or "torch" in r.stdout
