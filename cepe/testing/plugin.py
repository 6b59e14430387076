"""The pytest plugin of cepe (entry point `pytest11: cepe`): fixtures for
experiments on tiny random models, the pulled default model and the PyTorch
reference.

    def test_context_helps(tiny_cepe):            # a random CEPE model in tmp_path
        model = tiny_cepe.load()

    @pytest.mark.cepe_config(hidden_size=64, num_attention_heads=8)
    def test_wider(tiny_llama): ...               # the config, changed

    @pytest.mark.parametrize("tiny_llama", [{"num_key_value_heads": 4}], indirect=True)
    def test_mha(tiny_llama): ...                 # or parametrized

    def test_oracle(tiny_cepe, reference):        # reference: cepe.testing.reference
        ref = reference.load_reference(tiny_cepe.path)

torch is imported only by the `reference` fixture, which skips the test when
torch is missing; the other fixtures need NumPy only."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from . import TinyModel, write_tiny_cepe, write_tiny_llama


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cepe_config(**config): the tiny_llama / tiny_cepe config changes (seed=, encoder=, "
        "num_cross_attn_layers= too), e.g. cepe_config(hidden_size=64)",
    )


def _config(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The marker's settings, then an indirect parameter's (a dict) over them."""
    out: dict[str, Any] = {}
    marker = request.node.get_closest_marker("cepe_config")
    if marker is not None:
        if marker.args:
            raise TypeError("cepe_config takes keyword arguments only")
        out.update(marker.kwargs)
    param = getattr(request, "param", None)
    if param is not None:
        if not isinstance(param, dict):
            raise TypeError(f"{request.fixturename}'s parameter must be a dict of config changes, got {param!r}")
        out.update(param)
    return out


@pytest.fixture
def tiny_llama(request: pytest.FixtureRequest, tmp_path: Path) -> TinyModel:
    """A random LLaMA checkpoint (cepe.testing.TINY_LLAMA, changed by the cepe_config marker
    or an indirect parameter) in a temporary directory; .load() loads it."""
    return write_tiny_llama(tmp_path / "tiny_llama", **_config(request))


@pytest.fixture
def tiny_cepe(request: pytest.FixtureRequest, tmp_path: Path) -> TinyModel:
    """A random CEPE checkpoint (decoder, encoder, cross-attention) in a temporary directory,
    configured as tiny_llama (encoder=, num_cross_attn_layers= too)."""
    return write_tiny_cepe(tmp_path / "tiny_cepe", **_config(request))


@pytest.fixture(scope="session")
def default_model() -> Any:
    """cepe.load() of the default real model (smollm2-135m); the test is skipped, saying how
    to pull it, when it is not in the cache."""
    from ..load import load
    from ..pull import DEFAULT_MODEL, is_pulled

    if not is_pulled(DEFAULT_MODEL):
        pytest.skip(f"{DEFAULT_MODEL} is not pulled (run `cepe pull {DEFAULT_MODEL}`)")
    return load(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def reference() -> ModuleType:
    """The module cepe.testing.reference (the PyTorch reference of the decoder, the encoder
    and cross-attention); the test is skipped when torch or transformers is missing."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from . import reference as module

    return module
