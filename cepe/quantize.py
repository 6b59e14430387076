"""`cepe quantize`: any checkpoint cepe loads -> a GGUF decoder in a low-precision format.

    cepe quantize smollm2-135m small.gguf --type q8_0
    cepe quantize official-cepe-dir/ out-dir/ --type q4_0      # CEPE: out-dir/decoder.gguf + the head

The source is read one tensor at a time by cepe's own readers (an HF directory of safetensors,
a GGUF file, a pulled model's name, a CEPE head directory) and written with the gguf package's
GGUFWriter, tensor by tensor, its quantizers (gguf.quants) encoding each matrix: a 7B source
never has to fit in memory at once. The file follows llama.cpp's conventions, so llama.cpp
reads it too: llama.* hyper-parameters, the tokenizer as tokenizer.ggml.* (copied from a GGUF
source; built with gguf.vocab from an HF tokenizer), q/k rows in Meta's interleaved RoPE order
(HF's rotate-half rows are permuted as llama.cpp's converter does), norms in F32.

A CEPE model (encoder + cross-attention) becomes a directory that cepe.load reads as one
model: decoder.gguf plus a head (cepe.head: config.json naming decoder.gguf, head.safetensors
with the encoder and cross-attention, bf16 by default).

Matrices whose rows do not split into the format's 32-value blocks are written in F16
(as llama-quantize falls back), and the result says which.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .build import param_shapes
from .config import ROPE_LAYOUT_KEY, DecoderConfig, read_config
from .errors import CheckpointError
from .gguf_io import GGUF_MAGIC, GGUFFile, gguf_name, is_gguf, weight_names
from .gguf_io import read_config as read_gguf_config
from .head import (
    DECODER_KEY,
    FINGERPRINT_KEY,
    HEAD_FILE,
    SHARE_KEY,
    decoder_reference,
    fingerprint,
    is_head_tensor,
    with_decoder_settings,
)
from .resolve import resolve
from .safetensors_io import WRITE_DTYPES, Checkpoint, SafetensorsFile, write_safetensors
from .save import MODEL_FILES, fsync_path, write_json

# --type -> (gguf.GGMLQuantizationType name, gguf.LlamaFileType name)
TYPES = {
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "f16": ("F16", "MOSTLY_F16"),
    "f32": ("F32", "ALL_F32"),
}
DECODER_FILE = "decoder.gguf"
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Token-id keys llama.cpp reads as uint32, flags it reads as bool.
_U32_KEYS = ("_token_id",)
_BOOL_PREFIX = "tokenizer.ggml.add_"
_TOKEN_TYPE_UNUSED = 5


@dataclass
class _Source:
    """A checkpoint opened for reading, tensor by tensor, in HF names and float32."""

    path: str
    cfg: DecoderConfig
    names: list[str]  # HF names of every tensor to write (decoder and, for CEPE, head)
    get: Callable[[str], np.ndarray]
    layout: str  # the q/k row order of the stored decoder weights: "half" or "interleaved"
    tokenizer: Callable[[Any, int], None]  # writes tokenizer.* metadata for a vocabulary of n tokens
    name: str
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()


@dataclass(frozen=True)
class QuantizeResult:
    """What quantize() wrote."""

    decoder: str  # the GGUF file
    head: str | None  # the head directory (CEPE models), which cepe.load reads as the whole model
    type: str
    fallback: tuple[str, ...]  # tensors written in F16 because their rows do not split into blocks
    bytes: int  # of the GGUF file


# ------------------------------------------------------------------ sources


def _open_source(src: str) -> _Source:
    path = resolve(src)
    if is_gguf(path) and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SRC {path}: no such GGUF file")
        return _open_gguf(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"SRC {path}: no such model directory or file")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"SRC {path}: not a GGUF file or a model directory")
    cfg = read_config(path)
    if cfg.raw.get(DECODER_KEY):
        return _open_head(path, cfg)
    return _open_hf(path, cfg)


def _open_gguf(path: str) -> _Source:
    gf = GGUFFile(path)
    cfg = read_gguf_config(gf)
    names = weight_names(gf, cfg)  # file name -> HF name
    by_hf = {hf: name for name, hf in names.items()}
    meta = {k: v for k, v in gf.metadata.items() if k.startswith("tokenizer.")}

    def tokenizer(w: Any, n_vocab: int) -> None:
        _copy_tokenizer(w, meta, n_vocab, path)

    name = gf.metadata.get("general.name")
    return _Source(
        path,
        cfg,
        list(by_hf),
        lambda hf: gf.get(by_hf[hf]),
        "interleaved",
        tokenizer,
        name if isinstance(name, str) else Path(path).stem,
        [gf.close],
    )


def _hf_names(ckpt: Checkpoint, cfg: DecoderConfig) -> list[str]:
    names = [n for n in ckpt.names() if not n.endswith(_IGNORED_SUFFIXES)]
    if cfg.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    if cfg.raw.get(SHARE_KEY):
        names = [n for n in names if n != "encoder.embed_tokens.weight"]
    return names


def _open_hf(path: str, cfg: DecoderConfig) -> _Source:
    ckpt = Checkpoint(path)

    def tokenizer(w: Any, n_vocab: int) -> None:
        _hf_tokenizer(w, path, n_vocab)

    layout = cfg.rope.layout if cfg.rope is not None else "half"
    return _Source(path, cfg, _hf_names(ckpt, cfg), ckpt.get, layout, tokenizer, os.path.basename(path.rstrip("/")))


def _open_head(path: str, cfg: DecoderConfig) -> _Source:
    """A head directory: its decoder's tensors, then head.safetensors'."""
    dec = _open_source(decoder_reference(cfg.raw, path))
    head = SafetensorsFile(os.path.join(path, HEAD_FILE))
    head_names = head.keys()
    bad = [n for n in head_names if not is_head_tensor(n)]
    if bad:
        raise CheckpointError(f"{path}/{HEAD_FILE}: tensor {bad[0]} is not part of a head")

    def get(name: str) -> np.ndarray:
        return head.get(name) if name in head_names else dec.get(name)

    cfg = with_decoder_settings(cfg, dec.cfg)
    return _Source(path, cfg, dec.names + head_names, get, dec.layout, dec.tokenizer, dec.name, dec.closers)


# ------------------------------------------------------------------ tokenizer metadata


def _pad_tokens(w: Any, tokens: list[str], types: list[int], scores: list[float] | None, n_vocab: int) -> None:
    if len(tokens) > n_vocab:
        raise CheckpointError(f"the tokenizer has {len(tokens)} tokens but the embedding table only {n_vocab} rows")
    pad = n_vocab - len(tokens)  # embedding rows past the tokenizer's: llama.cpp's converter names them so
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), n_vocab)])
    w.add_token_types(types + [_TOKEN_TYPE_UNUSED] * pad)
    if scores is not None:
        w.add_token_scores(scores + [-1000.0] * pad)


def _copy_tokenizer(w: Any, meta: dict[str, Any], n_vocab: int, where: str) -> None:
    """tokenizer.* metadata of a GGUF source, with the value types llama.cpp reads them as."""
    import gguf

    vt = gguf.GGUFValueType
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        scores = meta.get("tokenizer.ggml.scores")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        _pad_tokens(w, list(tokens), list(types), None if scores is None else list(scores), n_vocab)
    for key, value in meta.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            continue
        if isinstance(value, list):
            if value and isinstance(value[0], list):
                warnings.warn(f"{where}: metadata {key} (nested arrays) is not copied", stacklevel=4)
                continue
            w.add_array(key, value)
        elif isinstance(value, bool) or key.startswith(_BOOL_PREFIX):
            w.add_key_value(key, bool(value), vt.BOOL)
        elif isinstance(value, int) and key.endswith(_U32_KEYS):
            w.add_key_value(key, value, vt.UINT32)
        elif isinstance(value, int):
            w.add_key_value(key, value, vt.INT32 if value < 2**31 else vt.UINT64)
        elif isinstance(value, float):
            w.add_key_value(key, value, vt.FLOAT32)
        elif isinstance(value, str):
            w.add_key_value(key, value, vt.STRING)


def _pre_tokenizer(tok_json: dict[str, Any]) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json: the name of its split regex in
    cepe.tokenizer's table, "default" for GPT-2's own (ByteLevel with its regex)."""
    from .tokenizer import PRE_TOKENIZER_SPLITS

    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            for name, split in PRE_TOKENIZER_SPLITS.items():
                if split == regex:
                    return name
            break
        if step.get("type") == "ByteLevel" and step.get("use_regex", True) and len(steps) == 1:
            return "default"
    warnings.warn(
        "the tokenizer's pre-tokenizer has no GGUF name cepe knows; written as GPT-2's ('default'), "
        "which may split some texts differently",
        stacklevel=4,
    )
    return "default"


def _hf_tokenizer(w: Any, model_dir: str, n_vocab: int) -> None:
    """tokenizer.ggml.* from an HF directory's tokenizer (gguf.vocab's readers, as llama.cpp's converter)."""
    import gguf
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab, SpecialVocab

    d = Path(model_dir)
    tj = d / "tokenizer.json"
    if (d / "tokenizer.model").is_file() and not tj.is_file():
        sp = SentencePieceVocab(d)
        kind, toks = "llama", list(sp.all_tokens())
    elif tj.is_file():
        from tokenizers import Tokenizer as Backend

        data = json.loads(tj.read_text(encoding="utf-8"))
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise NotImplementedError(f"{tj}: a {model.get('type')} tokenizer has no GGUF form cepe writes (BPE only)")
        if model.get("byte_fallback"):
            kind, toks = "llama", list(LlamaHfVocab(d).all_tokens())
        else:
            backend = Backend.from_file(str(tj))
            vocab = backend.get_vocab(with_added_tokens=True)
            by_id = {i: t for t, i in vocab.items()}
            if sorted(by_id) != list(range(len(by_id))):
                raise CheckpointError(f"{tj}: the token ids are not contiguous from 0")
            added = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
            ctl, user, normal = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.NORMAL
            kind = "gpt2"
            toks = [
                (by_id[i].encode(), 0.0, (ctl if added[by_id[i]] else user) if by_id[i] in added else normal)
                for i in range(len(by_id))
            ]
            w.add_tokenizer_pre(_pre_tokenizer(data))
    else:
        return  # no tokenizer: the model runs on token ids
    w.add_tokenizer_model(kind)
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t) for t, _, _ in toks]
    scores = [float(s) for _, s, _ in toks] if kind == "llama" else None
    _pad_tokens(w, texts, [int(k) for _, _, k in toks], scores, n_vocab)
    SpecialVocab(d, load_merges=kind == "gpt2", n_vocab=n_vocab).add_to_gguf(w, quiet=True)


# ------------------------------------------------------------------ decoder metadata


def _hparams(w: Any, cfg: DecoderConfig, name: str, file_type: int, quantized: bool) -> None:
    import gguf

    w.add_name(name)
    w.add_file_type(file_type)
    if quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    rope = cfg.rope
    w.add_rope_dimension_count(rope.rotary_dim if rope is not None else cfg.head_dim)
    if rope is None or rope.rope_type == "default":
        return
    if rope.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope.factor or 1.0))
    elif rope.rope_type == "yarn" and rope.attention_factor in (None, 1.0):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope.factor or 1.0))
        w.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings)
    else:
        raise NotImplementedError(
            f"RoPE scaling {rope.rope_type!r} has no GGUF form cepe writes (default, linear, yarn); "
            "quantize the unscaled model and pass rope_scaling to cepe.load"
        )


def _interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from HF's rotate-half order into Meta's interleaved pairs (llama.cpp's converter)."""
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# ------------------------------------------------------------------ writing


def _check_dst(dst: str, force: bool, cepe: bool) -> None:
    if os.path.islink(dst):
        raise FileExistsError(f"DST {dst} is a symbolic link: choose another path")
    if not os.path.lexists(dst):
        return
    if not force:
        raise FileExistsError(f"DST {dst} exists: pass --force (force=True) to replace it")
    if cepe:
        if not os.path.isdir(dst) or any(n not in (*MODEL_FILES, DECODER_FILE) for n in os.listdir(dst)):
            raise FileExistsError(f"DST {dst} exists and is not a quantized CEPE directory: not replacing it")
    elif not _starts_gguf(dst):
        raise FileExistsError(f"DST {dst} exists and is not a GGUF file: not replacing it")


def _starts_gguf(path: str) -> bool:
    """A regular file whose bytes start with GGUF's magic (a name ending in .gguf is not enough)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _plan(src: _Source, qname: str) -> tuple[list[tuple[str, str, tuple[int, ...], str]], list[str]]:
    """(HF name, GGUF name, shape, GGML type) of each decoder tensor, and those falling back to F16."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qname]][0]
    plan, fallback = [], []
    shapes = param_shapes(src.cfg)
    for hf in src.names:
        if is_head_tensor(hf):
            continue
        gname = gguf_name(hf)
        if gname is None:
            raise CheckpointError(f"{src.path}: tensor {hf} has no place in a llama GGUF file")
        shape = shapes[hf]
        if len(shape) == 1:
            t = "F32"
        elif shape[-1] % block:
            t = "F16"
            fallback.append(hf)
        else:
            t = qname
        plan.append((hf, gname, shape, t))
    return plan, fallback


def _encode(arr: np.ndarray, qname: str) -> np.ndarray:
    import gguf

    if qname == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qname == "F16":
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), gguf.GGMLQuantizationType[qname])


def _write_gguf(src: _Source, path: str, qtype: str, log: Callable[[str], None]) -> list[str]:
    import gguf

    qname, ftype = TYPES[qtype]
    plan, fallback = _plan(src, qname)
    cfg = src.cfg
    w = gguf.GGUFWriter(path, "llama")
    _hparams(w, cfg, src.name, int(gguf.LlamaFileType[ftype]), qname not in ("F32", "F16", "BF16"))
    src.tokenizer(w, cfg.vocab_size)
    for _hf, gname, shape, t in plan:
        gt = gguf.GGMLQuantizationType[t]
        block, size = gguf.GGML_QUANT_SIZES[gt]
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size
        w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=gt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    interleave = src.layout == "half"
    for i, (hf, gname, shape, t) in enumerate(plan):
        arr = src.get(hf)
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{src.path}: tensor {hf} has shape {arr.shape}, the config says {shape}")
        if interleave and hf.endswith("self_attn.q_proj.weight"):
            arr = _interleave(arr, cfg.num_attention_heads)
        elif interleave and hf.endswith("self_attn.k_proj.weight"):
            arr = _interleave(arr, cfg.num_key_value_heads)
        w.write_tensor_data(_encode(arr, t))
        log(f"[{i + 1}/{len(plan)}] {gname} {t}")
    w.close()
    return fallback


class _Lazy(Mapping[str, np.ndarray]):
    """The source's tensors, read on lookup: a 7B model's head (1.8B parameters) never sits in memory whole."""

    def __init__(self, src: _Source, names: list[str]) -> None:
        self.src, self.names = src, names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        return self.src.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _write_head(src: _Source, directory: str, decoder_file: str, head_dtype: str) -> None:

    write_safetensors(
        os.path.join(directory, HEAD_FILE), _Lazy(src, [n for n in src.names if is_head_tensor(n)]), head_dtype
    )
    raw = copy.deepcopy(src.cfg.raw)
    raw.pop(ROPE_LAYOUT_KEY, None)  # the decoder file's layout applies
    raw[DECODER_KEY] = decoder_file  # relative to the head directory: the two travel together
    raw[FINGERPRINT_KEY] = fingerprint({"model.norm.weight": src.get("model.norm.weight")})
    write_json(os.path.join(directory, "config.json"), raw)
    fsync_path(os.path.join(directory, HEAD_FILE))


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str,
    *,
    force: bool = False,
    head_dtype: str = "bfloat16",
    log: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Writes SRC's decoder as a GGUF file in format qtype (q8_0, q4_0, q4_1, bf16, f16, f32)
    to DST; for a CEPE model DST is a directory (decoder.gguf + config.json + head.safetensors,
    the head in head_dtype) that cepe.load reads as the whole model. An existing DST is replaced
    only with force=True, and only when it is a GGUF file (a quantized CEPE directory); the new
    file is written beside it and renamed over it at the end, so a failure leaves DST as it was."""
    if not isinstance(qtype, str) or qtype.lower() not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    qtype = qtype.lower()
    if head_dtype not in WRITE_DTYPES:
        raise ValueError(f"head_dtype must be one of {WRITE_DTYPES}, got {head_dtype!r}")
    src_s, dst_s = os.fspath(src), os.path.abspath(os.fspath(dst))
    source = _open_source(src_s)
    try:
        cepe = source.cfg.is_cepe
        if os.path.abspath(source.path) == dst_s:
            raise ValueError(f"DST {dst_s} is the source itself")
        _check_dst(dst_s, force, cepe)
        return _write(source, dst_s, qtype, head_dtype, cepe, force, log or (lambda _m: None))
    finally:
        source.close()


def _write(
    source: _Source, dst: str, qtype: str, head_dtype: str, cepe: bool, force: bool, log: Callable[[str], None]
) -> QuantizeResult:
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(dst)
    if cepe:
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        gguf_tmp = os.path.join(tmp, DECODER_FILE)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=".gguf", dir=parent)
        os.close(fd)
        gguf_tmp = tmp
    try:
        fallback = _write_gguf(source, gguf_tmp, qtype, log)
        if cepe:
            _write_head(source, tmp, DECODER_FILE, head_dtype)
        fsync_path(gguf_tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if cepe else 0o666) & ~umask)  # mkdtemp/mkstemp made it private
        old = None
        if cepe and os.path.isdir(dst):  # a directory is not replaced by a rename: move it aside first
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)
            os.rename(dst, old)
        os.replace(tmp, dst)
        if old:
            shutil.rmtree(old)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
        raise
    decoder = os.path.join(dst, DECODER_FILE) if cepe else dst
    if fallback:
        warnings.warn(
            f"{len(fallback)} matrices have rows that do not split into {qtype} blocks; written in F16 "
            f"({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''})",
            stacklevel=3,
        )
    return QuantizeResult(decoder, dst if cepe else None, qtype, tuple(fallback), os.path.getsize(decoder))
