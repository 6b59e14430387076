"""Model files that are damaged, hostile or changed under a loaded model: safetensors headers
the safetensors library rejects (duplicate names, overlapping or gapped data_offsets, shapes
that overflow), zeroed weights that check_weights must find, files that are FIFOs, devices or
far too large, deep GGUF metadata, and a loaded model whose files are rewritten or truncated
afterwards (it must own its memory)."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import write_tokenizer

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from test_gguf import gguf_hf_model, make_bpe_vocab, write_gguf  # noqa: E402

import cepe  # noqa: E402
from cepe import CheckpointError, ConfigError  # noqa: E402
from cepe.gguf_io import GGUFFile  # noqa: E402
from cepe.safetensors_io import SafetensorsFile  # noqa: E402

Q = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.array([3, 17, 42, 5, 60, 8])
MiB = 1 << 20


# ------------------------------------------------------------------ helpers


@pytest.fixture
def copy_of(model_factory, tmp_path):
    """copy_of(name="tiny", **model_factory kwargs) -> a fresh copy of that tiny HF model directory."""

    def make(name: str = "tiny", **kw: Any) -> str:
        src, _ = model_factory(name, **kw)
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        return dst

    return make


@pytest.fixture(scope="module")
def bpe_vocab():
    return make_bpe_vocab()


@pytest.fixture(scope="module")
def gguf_model(bpe_vocab):
    """A tiny HF llama of test_gguf's shape, to write GGUF files from."""
    return gguf_hf_model(bpe_vocab)


def read_header(path: str) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (in file order) and its data bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        return header, f.read()


def write_raw(path: str, pairs: list[tuple[str, Any]], data: bytes) -> None:
    """A safetensors file from header (name, entry) pairs written as given: a name may repeat."""
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    blob = text.encode()
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + data)


def edit_header(model_dir: str, fn: Callable[[list[tuple[str, Any]], bytes], tuple[list, bytes]]) -> str:
    path = os.path.join(model_dir, "model.safetensors")
    header, data = read_header(path)
    pairs, data = fn(list(header.items()), data)
    write_raw(path, pairs, data)
    return path


LOAD_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # reading /dev/zero must not take the machine
import cepe
try:
    cepe.load(sys.argv[1], n_threads=1)
    out = {"type": None, "message": ""}
except Exception as exc:
    out = {"type": type(exc).__name__, "message": str(exc)}
print(json.dumps(out))
"""


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def load_in_child(path: str, timeout: float = 120.0) -> tuple[str | None, str]:
    """cepe.load(path) in a child process limited in memory and time (so a load that blocks on
    a FIFO or reads /dev/zero fails the test instead of hanging it or exhausting the machine):
    the name of the exception it raised (None when it loaded) and its message."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", LOAD_CHILD, path],
            env=child_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"cepe.load({path!r}) blocked for {timeout:.0f} s")
    assert r.returncode == 0, f"the child died ({r.returncode}): {r.stderr[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["type"], out["message"]


def make_special(path: str, kind: str) -> None:
    """Replaces `path` with a FIFO, a symlink to /dev/zero, or a directory."""
    if os.path.lexists(path):
        os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)


KIND_WORDS = {"fifo": "a FIFO", "devzero": "a character device", "dir": "a directory"}


def gguf_kv_bytes(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return len(k).to_bytes(8, "little") + k + vtype.to_bytes(4, "little") + payload


def raw_gguf(path: str, kvs: list[bytes]) -> str:
    """A GGUF v3 file with these metadata entries and no tensors."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    return path


# ------------------------------------------------------------------ safetensors headers


def test_duplicate_tensor_name_is_rejected(copy_of):
    p = copy_of()

    def dup(pairs, data):  # a second model.norm.weight after the data: json would keep the last
        name, entry = next((n, e) for n, e in pairs if n == "model.norm.weight")
        n = entry["data_offsets"][1] - entry["data_offsets"][0]
        extra = {**entry, "data_offsets": [len(data), len(data) + n]}
        return pairs + [(name, extra)], data + np.full(n // 4, 7.0, "<f4").tobytes()

    path = edit_header(p, dup)
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*tensor model.norm.weight appears twice"):
        cepe.load(p)


def test_overlapping_data_offsets_are_rejected(copy_of):
    p = copy_of()

    def overlap(pairs, data):  # v_proj reads k_proj's bytes (same shape in the tiny model)
        d = dict(pairs)
        k = d["model.layers.0.self_attn.k_proj.weight"]
        d["model.layers.0.self_attn.v_proj.weight"] = {**k}
        return list(d.items()), data

    path = edit_header(p, overlap)
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*(overlaps|v_proj|k_proj)"):
        cepe.load(p)


def test_data_offsets_must_cover_the_data(copy_of):
    p = copy_of()
    path = edit_header(p, lambda pairs, data: (pairs, data + b"\0" * 64))  # trailing bytes
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*cover \d+ of its \d+ data bytes"):
        cepe.load(p)

    def gap(pairs, data):  # every tensor moved 64 bytes on (the trailing bytes of above dropped)
        moved = [
            (n, {**e, "data_offsets": [o + 64 for o in e["data_offsets"]]} if n != "__metadata__" else e)
            for n, e in pairs
        ]
        return moved, b"\0" * 64 + data[:-64]

    path = edit_header(p, gap)
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*leaves 64 bytes before it"):
        cepe.load(p)


@pytest.mark.parametrize(
    "shape",
    [[2**64], [2**62 + 12, 4]],  # beyond int64; a product that wraps int64 to the 48 values stored
    ids=["beyond-int64", "wrapping-product"],
)
def test_overflowing_shapes_name_the_tensor(copy_of, shape):
    p = copy_of()

    def bad(pairs, data):
        return [(n, {**e, "shape": shape} if n == "model.norm.weight" else e) for n, e in pairs], data

    path = edit_header(p, bad)
    with pytest.raises(CheckpointError, match=re.escape(path) + r": tensor model.norm.weight: .*needs"):
        cepe.load(p)


def test_header_length_beyond_the_bound(tmp_path):
    path = str(tmp_path / "big.safetensors")
    with open(path, "wb") as f:
        f.write((200 * MiB).to_bytes(8, "little"))
        f.truncate(201 * MiB)  # sparse: the file is long enough for what the header claims
    with pytest.raises(CheckpointError, match=re.escape(path) + r": header claims 209715200 bytes, more than"):
        SafetensorsFile(path)


@pytest.mark.parametrize("entry", [["model-00001-of-00002.safetensors"], 7, None, ""], ids=repr)
def test_shard_index_entries_must_be_file_names(copy_of, entry):
    p = copy_of("sharded", max_shard_size="40KB", num_hidden_layers=3)
    index = os.path.join(p, "model.safetensors.index.json")
    with open(index) as fh:
        data = json.load(fh)
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = entry
    with open(index, "w") as fh:
        json.dump(data, fh)
    with pytest.raises(CheckpointError, match=re.escape(index) + rf".*weight_map\['{re.escape(name)}'\]"):
        cepe.load(p)


# ------------------------------------------------------------------ FIFOs, devices, directories, sizes


HF_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors",
]


@pytest.mark.parametrize("kind", ["devzero", "fifo", "dir"])
@pytest.mark.parametrize("name", HF_FILES)
def test_special_files_in_a_model_directory(copy_of, name, kind):
    p = copy_of()
    write_tokenizer(pathlib.Path(p), 97)
    path = os.path.join(p, name)
    make_special(path, kind)
    kind_of_error, msg = load_in_child(p)
    assert kind_of_error in ("CheckpointError", "ConfigError"), f"{name} as {kind}: {kind_of_error}: {msg}"
    assert path in msg and KIND_WORDS[kind] in msg, msg


@pytest.mark.parametrize("kind", ["devzero", "fifo"])
def test_special_shard_index(copy_of, kind):
    p = copy_of("sharded", max_shard_size="40KB", num_hidden_layers=3)
    index = os.path.join(p, "model.safetensors.index.json")
    make_special(index, kind)
    kind_of_error, msg = load_in_child(p)
    assert kind_of_error == "CheckpointError" and index in msg and KIND_WORDS[kind] in msg, (kind_of_error, msg)


@pytest.mark.parametrize("kind", ["devzero", "fifo"])
def test_special_gguf_file(tmp_path, kind):
    path = str(tmp_path / "m.gguf")
    make_special(path, kind)
    kind_of_error, msg = load_in_child(path)
    assert kind_of_error == "CheckpointError" and path in msg and KIND_WORDS[kind] in msg, (kind_of_error, msg)


def test_special_head_file(tiny, tmp_path):
    head = cepe.attach_encoder(cepe.load(tiny[0]), encoder_layers=1, num_cross_attn_layers=1)
    d = head.save(str(tmp_path / "head"))
    path = os.path.join(d, "head.safetensors")
    make_special(path, "devzero")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*a character device"):
        cepe.load(d)


@pytest.mark.parametrize(
    "name, size, exc",
    [
        ("config.json", 17 * MiB, ConfigError),
        ("generation_config.json", 17 * MiB, ConfigError),
        ("tokenizer_config.json", 17 * MiB, CheckpointError),
        ("tokenizer.json", 65 * MiB, CheckpointError),
    ],
)
def test_files_beyond_their_size_limit(copy_of, name, size, exc):
    p = copy_of()
    write_tokenizer(pathlib.Path(p), 97)
    path = os.path.join(p, name)
    with open(path, "r+b") as f:
        f.truncate(size)  # sparse
    with pytest.raises(exc, match=re.escape(path) + rf": .* is {size} bytes, more than the \d+ MiB"):
        cepe.load(p)


# ------------------------------------------------------------------ GGUF metadata


def test_gguf_metadata_nested_deep(tmp_path):
    depth = 1000
    payload = b"".join((9).to_bytes(4, "little") + (1).to_bytes(8, "little") for _ in range(depth))
    payload += (0).to_bytes(4, "little") + (0).to_bytes(8, "little")  # innermost: an empty u8 array
    path = raw_gguf(str(tmp_path / "deep.gguf"), [gguf_kv_bytes("general.deep", 9, payload)])
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*metadata 'general.deep' nests arrays"):
        cepe.load(path)


def test_gguf_metadata_array_items_are_bounded(tmp_path):
    n = (1 << 24) + 1
    payload = (0).to_bytes(4, "little") + n.to_bytes(8, "little") + bytes(n)  # n u8 items
    path = raw_gguf(str(tmp_path / "items.gguf"), [gguf_kv_bytes("general.many", 9, payload)])
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*metadata 'general.many'.*array items"):
        GGUFFile(path)


def test_gguf_metadata_size_is_bounded(tmp_path):
    n = 300 * MiB
    path = str(tmp_path / "long.gguf")
    raw_gguf(path, [gguf_kv_bytes("general.name", 8, n.to_bytes(8, "little"))])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) + n)  # sparse: the string's bytes are there
    with pytest.raises(CheckpointError, match=re.escape(path) + r".*metadata 'general.name' ends past byte"):
        GGUFFile(path)


def test_gguf_value_errors_name_the_gguf_file(tmp_path, gguf_model, bpe_vocab):
    path = write_gguf(str(tmp_path / "m.gguf"), gguf_model, bpe_vocab)
    data = bytearray(open(path, "rb").read())
    key = b"llama.attention.head_count"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key) + 4  # after the u32 type id
    data[at : at + 4] = (3).to_bytes(4, "little")  # 3 heads over 2 kv heads
    open(path, "wb").write(bytes(data))
    with pytest.raises(ConfigError) as info:
        cepe.load(path)
    msg = str(info.value)
    assert msg.startswith(path) and "llama.attention.head_count" in msg and "config.json" not in msg, msg


# ------------------------------------------------------------------ check_weights finds zeroed tensors


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
@pytest.mark.parametrize("tensor", ["output_norm.weight", "blk.1.ffn_down.weight"])
def test_check_weights_finds_a_zeroed_gguf_tensor(tmp_path, gguf_model, bpe_vocab, qtype, tensor):
    path = write_gguf(str(tmp_path / "m.gguf"), gguf_model, bpe_vocab, qtype)
    t = GGUFFile(path).tensors[tensor]
    with open(path, "r+b") as f:  # the tensor's bytes zeroed, the file's length kept
        f.seek(t.offset)
        f.write(bytes(t.nbytes))
    with pytest.raises(CheckpointError, match=re.escape(path) + rf": tensor {re.escape(tensor)} is entirely zero"):
        cepe.load(path, check_weights=True)
    cepe.load(path)  # unchecked, it loads


def test_check_weights_finds_a_zeroed_safetensors_tensor(copy_of):
    p = copy_of()
    path = os.path.join(p, "model.safetensors")
    header, _ = read_header(path)
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    b, e = header["model.layers.1.self_attn.q_proj.weight"]["data_offsets"]
    with open(path, "r+b") as f:
        f.seek(start + b)
        f.write(bytes(e - b))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.self_attn.q_proj.weight is entirely zero"):
        cepe.load(p, check_weights=True)


def test_check_weights_accepts_a_fresh_zero_init_head(tiny, tmp_path):
    head = cepe.attach_encoder(cepe.load(tiny[0]), encoder_layers=1, num_cross_attn_layers=1, init="zero")
    d = head.save(str(tmp_path / "head"))
    cepe.load(d, check_weights=True)  # its cross-attention o_proj is zero by design


def test_check_weights_finds_the_damage_in_a_real_gguf(tmp_path):
    pull = importlib.import_module("cepe.pull")

    if not pull.is_pulled("smollm2-135m"):
        pytest.skip("smollm2-135m is not pulled (cepe pull smollm2-135m)")
    path = str(tmp_path / "smollm2.gguf")
    shutil.copyfile(pull.model_path("smollm2-135m"), path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # its last 1 MiB zeroed, full length: the final norm among it
        f.seek(size - MiB)
        f.write(bytes(MiB))
    with pytest.raises(CheckpointError, match=re.escape(path) + r": tensor \S+ is entirely zero"):
        cepe.load(path, check_weights=True, n_threads=1)


# ------------------------------------------------------------------ a loaded model owns its memory


@pytest.fixture
def model_files(copy_of, tmp_path, gguf_model, bpe_vocab):
    """kind -> (the path cepe.load takes, the weight file to damage)."""

    def make(kind: str) -> tuple[str, str]:
        if kind in ("fp32", "fp16"):
            p = copy_of("tiny") if kind == "fp32" else copy_of("tiny-fp16", dtype=torch.float16)
            return p, os.path.join(p, "model.safetensors")
        qtype = Q.F32 if kind == "gguf-f32" else Q.Q8_0
        path = write_gguf(str(tmp_path / f"{kind}.gguf"), gguf_model, bpe_vocab, qtype)
        return path, path

    return make


KINDS = ["fp32", "fp16", "gguf-f32", "gguf-q8_0"]


@pytest.mark.parametrize("kind", KINDS)
def test_rewriting_the_file_does_not_change_a_loaded_model(model_files, kind):
    path, weights = model_files(kind)
    model = cepe.load(path, n_threads=1)
    before = model.forward(IDS)
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:  # every byte after the first KiB rewritten, in place
        f.seek(1024)
        f.write(np.random.default_rng(0).integers(0, 256, size - 1024, dtype=np.uint8).tobytes())
    np.testing.assert_array_equal(model.forward(IDS), before)


CHILD = """
import os, shutil, sys
import numpy as np
import cepe
path, weights, how = sys.argv[1:4]
ids = np.array([3, 17, 42, 5, 60, 8])
model = cepe.load(path, n_threads=1)
before = model.forward(ids)
if how == "truncate":
    os.truncate(weights, os.path.getsize(weights) // 2)
else:  # a smaller file copied over it
    with open(weights + ".small", "wb") as f:
        f.write(b"x" * 100)
    shutil.copyfile(weights + ".small", weights)
after = model.forward(ids)
sys.exit(0 if np.array_equal(before, after) else 3)
"""


@pytest.mark.parametrize("how", ["truncate", "copy-smaller"])
@pytest.mark.parametrize("kind", KINDS)
def test_shrinking_the_file_does_not_kill_a_loaded_model(model_files, kind, how):
    path, weights = model_files(kind)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, path, weights, how],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != -7, f"SIGBUS: the model read its weights from the shrunk file\n{r.stderr[-2000:]}"
    assert r.returncode == 0, f"exit {r.returncode} (3: the logits changed)\n{r.stderr[-2000:]}"


@pytest.mark.parametrize("content", ["", " \n\t"])
def test_empty_chat_template_names_its_file(copy_of, content):
    p = copy_of()
    write_tokenizer(pathlib.Path(p), 97)
    path = os.path.join(p, "chat_template.jinja")
    with open(path, "w") as fh:
        fh.write(content)
    tok = cepe.load(p).tokenizer
    with pytest.raises(ValueError, match=re.escape(path) + " is empty"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
