"""Loading: missing, unexpected, mis-shaped, corrupt and truncated checkpoints,
and config values we do not support, each named in the error."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import edit_json
from safetensors.numpy import load_file, save_file

import cepe
from cepe import CheckpointError, ConfigError


@pytest.fixture
def copy_of(tiny, tmp_path):
    def make() -> str:
        dst = str(tmp_path / "model")
        shutil.copytree(tiny[0], dst)
        return dst

    return make


def edit_tensors(path: str, fn) -> None:
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def edit_config(path: str, fn) -> None:
    edit_json(os.path.join(path, "config.json"), fn)


@pytest.mark.parametrize(
    "edit, match",
    [
        pytest.param(
            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
            "missing tensor model.layers.1.mlp.up_proj.weight",
            id="missing_tensor",
        ),
        pytest.param(
            lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)),
            "unexpected tensor model.layers.0.extra.weight",
            id="unexpected_tensor",
        ),
        pytest.param(
            lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((23, 48), np.float32)),
            r"model.layers.0.self_attn.k_proj.weight has shape \(23, 48\), the config implies \(24, 48\)",
            id="misshaped_tensor",
        ),
        pytest.param(
            lambda t: t.__setitem__("model.norm.weight", np.ones(48, np.int32)),
            "model.norm.weight has dtype I32",
            id="integer_tensor_is_rejected",
        ),
    ],
)
def test_bad_tensor(copy_of, edit, match):
    p = copy_of()
    edit_tensors(p, edit)
    with pytest.raises(CheckpointError, match=match):
        cepe.load(p)


def test_truncated_file(copy_of):
    p = copy_of()
    f = os.path.join(p, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match="outside the file's .* data bytes"):
        cepe.load(p)
    with open(f, "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(CheckpointError, match=r"truncated file \(5 bytes\)"):
        cepe.load(p)


def test_header_claims_more_than_the_file(copy_of):
    p = copy_of()
    f = os.path.join(p, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.write((10**9).to_bytes(8, "little"))
    with pytest.raises(CheckpointError, match="header claims 1000000000 bytes"):
        cepe.load(p)


def test_corrupt_header(copy_of):
    p = copy_of()
    f = os.path.join(p, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        cepe.load(p)


def test_bad_data_offsets(copy_of, tmp_path):
    p = copy_of()
    f = os.path.join(p, "model.safetensors")
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [48], "data_offsets": [0, 100]}}).encode()
    with open(f, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    with pytest.raises(CheckpointError, match=r"100 bytes stored, shape \(48,\) of F32 needs 192"):
        cepe.load(p)


def test_no_weights(copy_of):
    p = copy_of()
    os.remove(os.path.join(p, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        cepe.load(p)
    open(os.path.join(p, "pytorch_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match="PyTorch .bin files found"):
        cepe.load(p)


def test_weights_path_is_a_directory(copy_of):
    p = copy_of()
    os.remove(os.path.join(p, "model.safetensors"))
    os.mkdir(os.path.join(p, "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors: .*must be a regular file, but it is a directory"):
        cepe.load(p)


def test_sharded_index_errors(model_factory, tmp_path):
    src, _ = model_factory("sharded", max_shard_size="40KB", num_hidden_layers=3)
    p = str(tmp_path / "sharded")
    shutil.copytree(src, p)
    index = os.path.join(p, "model.safetensors.index.json")
    with open(index) as fh:
        data = json.load(fh)
    shard = sorted(set(data["weight_map"].values()))[-1]
    os.remove(os.path.join(p, shard))
    with pytest.raises(CheckpointError, match=f"names shard '{shard}', which is not in"):
        cepe.load(p)
    with open(index, "w") as fh:
        fh.write("{not json")
    with pytest.raises(CheckpointError, match="corrupt shard index"):
        cepe.load(p)


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        cepe.load(str(tmp_path / "nope"))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        cepe.load(str(f))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        cepe.load(str(tmp_path / "empty"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_permission_denied(copy_of):
    p = copy_of()
    os.chmod(os.path.join(p, "model.safetensors"), 0)
    with pytest.raises(PermissionError):
        cepe.load(p)


@pytest.mark.parametrize(
    "edit, exc, match",
    [
        (lambda c: c.pop("hidden_size"), ConfigError, "missing required key 'hidden_size'"),
        (lambda c: c.update(hidden_size="48"), ConfigError, "'hidden_size' must be an integer, got '48'"),
        (lambda c: c.update(num_hidden_layers=0), ConfigError, "'num_hidden_layers' must be >= 1, got 0"),
        (lambda c: c.update(num_hidden_layers=3_866_860), ConfigError, "'num_hidden_layers' 3866860 is larger than"),
        (
            lambda c: c.update(num_key_value_heads=3),
            ConfigError,
            r"num_attention_heads \(4\) must be a multiple",
        ),
        (lambda c: c.update(rms_norm_eps=-1), ConfigError, "'rms_norm_eps' must be a finite number > 0"),
        (lambda c: c.update(model_type="gpt2"), ConfigError, "model_type 'gpt2' is not supported"),
        (lambda c: c.update(hidden_act="gelu"), NotImplementedError, "hidden_act 'gelu'"),
        (lambda c: c.update(attention_bias=True), NotImplementedError, "attention_bias=true"),
        (
            lambda c: c.update(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}),
            NotImplementedError,
            "proportional",
        ),
        (
            lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": "big"}),
            ConfigError,
            "rope_parameters.rope_theta must be a number",
        ),
        (
            lambda c: c.update(tie_word_embeddings="yes"),
            ConfigError,
            "'tie_word_embeddings' must be true or false",
        ),
        (lambda c: c.update(eos_token_id=[2, -5]), ConfigError, "'eos_token_id' must be a token id"),
        (lambda c: c.update(head_dim=7), ConfigError, "head_dim must be even"),
    ],
)
def test_bad_config(copy_of, edit, exc, match):
    p = copy_of()
    edit_config(p, edit)
    with pytest.raises(exc, match=match):
        cepe.load(p)


def test_config_not_json(copy_of):
    p = copy_of()
    with open(os.path.join(p, "config.json"), "w") as fh:
        fh.write("{")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        cepe.load(p)
    with open(os.path.join(p, "config.json"), "w") as fh:
        fh.write("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        cepe.load(p)


def test_transformers4_style_config(copy_of, tiny):
    """rope_theta at top level (transformers 4.x) reads the same as rope_parameters."""
    p = copy_of()

    def to_v4(c):
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        c["rope_scaling"] = None

    edit_config(p, to_v4)
    ids = np.array([[3, 4, 5, 6]])
    np.testing.assert_array_equal(cepe.load(p).forward(ids), cepe.load(tiny[0]).forward(ids))


def test_float32_weights_are_owned_not_mapped(tiny):
    model = cepe.load(tiny[0])
    from cepe.safetensors_io import Checkpoint

    arr = Checkpoint(tiny[0]).get("model.embed_tokens.weight")
    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert root.flags.owndata and not isinstance(root, np.memmap)  # the model outlives changes to its file
    assert model.forward(np.array([3])).shape == (1, 97)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weights(copy_of, bad):
    p = copy_of()

    def poison(t):
        w = t["model.layers.1.mlp.down_proj.weight"].copy()
        w[3, 4] = bad
        t["model.layers.1.mlp.down_proj.weight"] = w

    edit_tensors(p, poison)
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf"):
        cepe.load(p, check_weights=True)
    # unchecked, the model loads, and the forward reports the damage instead of returning NaN logits
    with pytest.raises(ValueError, match="logits are not finite .* check the magnitude of the weights"):
        cepe.load(p).forward(np.array([3, 4, 5]))


def test_float64_beyond_float32_range_is_rejected(copy_of):
    # found by fuzzing: the cast to float32 turned such values into inf without a word
    p = copy_of()
    name = "model.layers.0.mlp.up_proj.weight"

    def widen(t, big):
        w = t[name].astype(np.float64)
        w[1, 2] = big
        t[name] = w

    edit_tensors(p, lambda t: widen(t, 1e300))
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds 1 float64 value\(s\) beyond float32's range"):
        cepe.load(p)
    edit_tensors(p, lambda t: widen(t, 0.5))  # in range: loads, converted
    assert np.isfinite(cepe.load(p).forward(np.array([3, 4]))).all()


def test_nan_inputs_never_reach_the_core(tiny):
    model = cepe.load(tiny[0])
    with pytest.raises(ValueError, match="finite"):
        model.forward(np.array([[3, 4]]), position_ids=np.array([[0.0, np.inf]]))
