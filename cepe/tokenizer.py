"""Text <-> token ids for cepe models, on the HF `tokenizers` library.

    tok = model.tokenizer                       # set by cepe.load (None if the checkpoint has none)
    ids = tok.encode("Hello world")             # list[int], with the BOS the model expects
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Tokenizer.from_dir(model_dir) reads an HF tokenizer.json (+ tokenizer_config.json).
Tokenizer.from_gguf(path_or_file) builds the tokenizer a GGUF file's metadata
describes, as transformers 5 does for `from_pretrained(..., gguf_file=...)`:

- tokenizer.ggml.model "gpt2": byte-level BPE with the file's merges; tokens
  the file spells outside the byte alphabet are re-spelled; the split regex
  follows tokenizer.ggml.pre (GPT-2's by default, Llama 3's for "llama-bpe" ...).
- tokenizer.ggml.model "llama": SentencePiece-style BPE over the vocabulary
  with byte fallback and a "▁" prefix on the first word; merges from the file,
  or rebuilt from the token scores when the file has none.

Tokens typed CONTROL become special tokens (matched whole, dropped by
decode(skip_special_tokens=True)), USER_DEFINED ones plain added tokens; BOS/EOS
are added by encode() as the file's add_bos_token / add_eos_token flags say.
"""

from __future__ import annotations

import builtins
import contextvars
import copy
import functools
import json
import os
import re
import types
from collections.abc import Iterator, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from .errors import CheckpointError
from .files import CONFIG_LIMIT, TOKENIZER_LIMIT, read_json, read_small, read_text
from .gguf_io import GGUFFile
from .text import check_text

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of BPE vocabularies, by tokenizer.ggml.pre (llama-family files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token
    into two tokens of the vocabulary, best-scored token first (as transformers'
    generate_merges: ties by shorter left piece, then shorter right piece)."""
    found: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        pairs = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend(pairs)
    found.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # tokenizer_config.json's AddedToken form
        v = v.get("content")
    return v if isinstance(v, str) else None


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(piece: str, byte_level: dict[str, int] | None) -> bytes:
    """A vocabulary entry's text as bytes: byte-level BPE maps characters back
    to bytes; SentencePiece-style pieces spell spaces as U+2581 and bytes as <0xXX>."""
    if byte_level is not None and all(c in byte_level for c in piece):
        return bytes(byte_level[c] for c in piece)
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


class SentencePieceBackend:
    """A SentencePiece model (tokenizer.model, LLaMA-2's format) behind the few
    methods Tokenizer uses of a tokenizers.Tokenizer, with the slow HF
    LlamaTokenizer's conventions: BOS prepended (add_bos_token), no EOS, and
    special-token strings in the text mapped to their ids."""

    def __init__(self, path: str, *, add_bos: bool = True, add_eos: bool = False) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise ImportError(f'{path} is a SentencePiece model: pip install "cepe[sentencepiece]"') from None
        self.proto = read_small(path, what="SentencePiece model", limit=TOKENIZER_LIMIT, error=CheckpointError)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError variants
            raise CheckpointError(f"{path}: cannot read the SentencePiece model ({exc})") from None
        self.path = path
        self.add_bos, self.add_eos = add_bos, add_eos
        n = self.sp.get_piece_size()
        self._control = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        specials = sorted(
            (self.sp.id_to_piece(i) for i in self._control if i != self.sp.unk_id()), key=len, reverse=True
        )
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        ids: list[int] = []
        parts = self._split.split(text) if self._split else [text]
        for k, part in enumerate(parts):
            if k % 2 == 1:  # a special-token string
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids += self.sp.encode(part)
        if add_special_tokens:
            if self.add_bos and self.sp.bos_id() >= 0:
                ids = [self.sp.bos_id()] + ids
            if self.add_eos and self.sp.eos_id() >= 0:
                ids = ids + [self.sp.eos_id()]
        return SimpleNamespace(ids=ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self._control])
        out: list[str] = []
        run: list[int] = []
        for i in ids:  # control pieces decode to "" in SentencePiece: spell them out
            if i in self._control:
                out.append(self.sp.decode(run) + self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)


class Tokenizer:
    """A tokenizers.Tokenizer (or a SentencePiece model) plus the special tokens
    and chat template of a model."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        chat_template_source: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source  # where it was read (errors name it)

    # ----------------------------------------------------------- properties

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"cepe.Tokenizer(vocab={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ---------------------------------------------------------------- text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens adds the BOS/EOS the model expects."""
        check_text(text, "text")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = True) -> str:
        """The text of token ids (a list, or a 1-D NumPy array)."""
        items = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        n = self.vocab_size
        for i in items:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")
        return str(self.backend.decode(items, skip_special_tokens=skip_special_tokens))

    def token_bytes(self, vocab_size: int | None = None) -> tuple[Any, Any]:
        """Each token's bytes as they appear inside a decoded text (none for the
        special tokens decode skips, nor for ids from the tokenizer's vocabulary
        up to vocab_size): (bytes uint8, offsets int32 (vocab_size + 1)), token
        i being bytes[offsets[i]:offsets[i + 1]]. The core matches stop strings
        on them. Computed once per vocab_size."""
        import numpy as np

        n = self.vocab_size if vocab_size is None else int(vocab_size)
        cache = self.__dict__.setdefault("_token_bytes", {})
        if n in cache:
            return cache[n]
        backend = self.backend
        pieces: list[bytes] = []
        sp = getattr(backend, "sp", None)
        if sp is not None:  # a SentencePiece model
            for i in range(min(int(sp.get_piece_size()), n)):
                skip = sp.is_control(i) or sp.is_unknown(i)
                pieces.append(b"" if skip else _piece_bytes(sp.id_to_piece(i), None))
        else:  # a tokenizers.Tokenizer
            decoder = getattr(backend, "decoder", None)
            state = json.loads(decoder.__getstate__()) if decoder is not None else {}
            kinds = {state.get("type")} | {d.get("type") for d in state.get("decoders", [])}
            byte_level = {c: b for b, c in bytes_to_unicode().items()} if "ByteLevel" in kinds else None
            added = backend.get_added_tokens_decoder()
            for i in range(min(int(backend.get_vocab_size(with_added_tokens=True)), n)):
                if i in added:
                    pieces.append(b"" if added[i].special else str(added[i].content).encode("utf-8"))
                    continue
                piece = backend.id_to_token(i)
                pieces.append(b"" if piece is None else _piece_bytes(piece, byte_level))
        pieces += [b""] * (n - len(pieces))
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        if offsets[-1] > 2**31 - 1:
            raise ValueError("the vocabulary's text exceeds 2 GiB")
        cache[n] = (np.frombuffer(b"".join(pieces), np.uint8).copy(), offsets.astype(np.int32))
        return cache[n]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text of a conversation ([{"role": ..., "content": ...}, ...]),
        rendered with the model's Jinja chat template as transformers does
        (trim_blocks, lstrip_blocks). Encode it with add_special_tokens=False
        when the template writes the BOS itself.

        A template comes with the model file, so it is untrusted: it runs in
        jinja2's immutable sandbox, with limits on range() (TEMPLATE_MAX_RANGE
        items), on the loop steps and calls of one rendering (TEMPLATE_MAX_STEPS)
        and on the size of every string or list it builds, its output included
        (TEMPLATE_MAX_CHARS plus 4x the messages' length). A template that
        breaks them, or fails in any other way, raises ValueError naming the
        template's file."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if not self.chat_template.strip():
            raise ValueError(f"the {self.chat_template_source or 'chat template'} is empty")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        special = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
        }
        source = self.chat_template_source or "the tokenizer"
        given = sum(len(str(v)) for m in messages for v in m.values())
        return render_template(
            self.chat_template,
            source,
            TEMPLATE_MAX_CHARS + 4 * given,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **special,
            **kwargs,
        )

    # ------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike[str]) -> list[str]:
        """Writes the files from_dir() reads back to this tokenizer: tokenizer.json (or the
        SentencePiece tokenizer.model) and tokenizer_config.json (special tokens, chat template).
        Returns the paths written."""
        d = os.fspath(directory)
        written = []
        conf: dict[str, Any] = {
            key: value
            for key, value in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("pad_token", self.pad_token),
                ("unk_token", self.unk_token),
                ("chat_template", self.chat_template),
            )
            if value is not None
        }
        if isinstance(self.backend, SentencePieceBackend):
            path = os.path.join(d, "tokenizer.model")
            with open(path, "wb") as f:  # the model as loaded, whatever its file holds now
                f.write(self.backend.proto)
            conf.update(add_bos_token=self.backend.add_bos, add_eos_token=self.backend.add_eos)
        else:
            path = os.path.join(d, "tokenizer.json")
            self.backend.save(path)
        written.append(path)
        path = os.path.join(d, "tokenizer_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(conf, f, indent=1, ensure_ascii=False)
        written.append(path)
        return written

    # ------------------------------------------------------------ builders

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer | None:
        """The tokenizer of an HF model directory (tokenizer.json), None if it has none."""
        from tokenizers import Tokenizer as Backend

        d = os.fspath(model_dir)
        path = os.path.join(d, "tokenizer.json")
        sp_path = os.path.join(d, "tokenizer.model")
        backend: Any
        if os.path.lexists(path):  # anything there but a regular file is an error, not "no tokenizer"
            text = read_text(path, what="tokenizer.json", limit=TOKENIZER_LIMIT, error=CheckpointError)
            try:
                backend = Backend.from_str(text)
            except Exception as exc:  # tokenizers raises plain Exception on a bad file
                raise CheckpointError(f"{path}: cannot read the tokenizer ({exc})") from None
        elif os.path.lexists(sp_path):
            backend = None  # built below, once tokenizer_config.json says whether to add BOS/EOS
        else:
            return None
        conf: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            p = os.path.join(d, name)
            if os.path.lexists(p):
                data = read_json(p, what=name, limit=CONFIG_LIMIT, error=CheckpointError)
                if isinstance(data, dict):
                    conf.update({k: v for k, v in data.items() if v is not None})
        template = conf.get("chat_template")
        template_source = os.path.join(d, "tokenizer_config.json")
        jinja = os.path.join(d, "chat_template.jinja")
        if os.path.lexists(jinja):
            template_source = jinja
            template = read_text(jinja, what="chat template", limit=CONFIG_LIMIT, error=CheckpointError)
            template = template.replace("\r\n", "\n").replace("\r", "\n")  # as open()'s text mode reads it
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if backend is None:
            backend = SentencePieceBackend(
                sp_path, add_bos=bool(conf.get("add_bos_token", True)), add_eos=bool(conf.get("add_eos_token", False))
            )
            for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
                conf.setdefault(key, default if backend.token_to_id(default) is not None else None)
        return cls(
            backend,
            bos_token=_token_str(conf.get("bos_token")),
            eos_token=_token_str(conf.get("eos_token")),
            pad_token=_token_str(conf.get("pad_token")),
            unk_token=_token_str(conf.get("unk_token")),
            chat_template=template if isinstance(template, str) else None,
            chat_template_source=f"chat template of {template_source}",
        )

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """The tokenizer a GGUF file's metadata describes. source: a path, a
        cepe.gguf_io.GGUFFile, or a gguf.GGUFReader."""
        if isinstance(source, (str, os.PathLike)):
            gf = GGUFFile(source)
            meta, where = gf.metadata, gf.path
        elif isinstance(source, GGUFFile):
            meta, where = source.metadata, source.path
        elif hasattr(source, "fields"):  # gguf.GGUFReader
            meta = {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
            where = "GGUF reader"
        else:
            raise TypeError(f"from_gguf takes a path, a GGUFFile or a gguf.GGUFReader, got {type(source).__name__}")
        return cls.from_gguf_metadata(meta, where)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], where: str) -> Tokenizer:
        """The tokenizer GGUF metadata (GGUFFile.metadata, or gguf_io.read_header's) describes;
        where: the file it came from (errors name it)."""
        try:
            tok = cls._from_metadata(meta)
            tok.chat_template_source = f"chat template of {where} (tokenizer.chat_template)"
            return tok
        except (KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{where}: bad tokenizer metadata ({exc!r})") from None
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        except NotImplementedError:
            raise
        except Exception as exc:  # the tokenizers library raises bare Exception on inconsistent vocabularies
            raise CheckpointError(f"{where}: bad tokenizer metadata ({exc})") from None

    @classmethod
    def _from_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend
        from tokenizers.models import BPE

        check_gguf_model(meta)
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError("tokenizer.ggml.tokens is missing or not a list of strings")
        types = meta.get("tokenizer.ggml.token_type") or []
        merges_raw = meta.get("tokenizer.ggml.merges")
        merges: list[tuple[str, str]] | None = None
        if merges_raw is not None:
            merges = []
            for m in merges_raw:
                parts = m.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"tokenizer.ggml.merges holds a malformed merge {m!r}")
                merges.append((parts[0], parts[1]))

        byte_level = kind == "gpt2"
        if byte_level:
            spelling = bytes_to_unicode()
            alphabet = set(spelling.values())
            vocab = {
                t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                for i, t in enumerate(tokens)
            }
            backend = Backend(
                BPE(
                    vocab=vocab,
                    merges=merges or [],
                    dropout=None,
                    continuing_subword_prefix="",
                    end_of_word_suffix="",
                    fuse_unk=False,
                )
            )
            pre: Any = meta.get("tokenizer.ggml.pre")  # any value: a name no split knows means none
            split = PRE_TOKENIZER_SPLITS.get(pre)
            if split is None:
                backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            else:
                backend.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Split(Regex(split), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                    ]
                )
            backend.decoder = decoders.ByteLevel()
            add_bos_default = False
        elif kind == "llama":
            vocab = {t: i for i, t in enumerate(tokens)}
            if merges is None:
                scores = meta.get("tokenizer.ggml.scores")
                if not isinstance(scores, list) or len(scores) != len(tokens):
                    raise ValueError("a 'llama' vocabulary needs tokenizer.ggml.merges or tokenizer.ggml.scores")
                merges = merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
            backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
            backend.normalizer = None
            backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            backend.decoder = decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
            )
            add_bos_default = True
        else:  # pragma: no cover - check_gguf_model refused it
            raise AssertionError(kind)

        # CONTROL tokens whole and special; USER_DEFINED whole, not special.
        spelled = set(bytes_to_unicode().values()) if byte_level else None
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, kind_id in zip(tokens, types, strict=False)
            if kind_id == _CONTROL and (spelled is None or set(t) <= spelled)
        ]
        if control:
            backend.add_special_tokens(control)
        known = backend.get_vocab()
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, kind_id in zip(tokens, types, strict=False)
            if kind_id == _USER_DEFINED and t in known
        ]
        if user:
            backend.add_tokens(user)

        def named(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        bos, eos, unk, pad = (
            named("bos_token_id"),
            named("eos_token_id"),
            named("unknown_token_id"),
            named("padding_token_id"),
        )
        added = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
        extra = [AddedToken(t, special=True) for t in dict.fromkeys((bos, eos, unk, pad)) if t and t not in added]
        if extra:
            backend.add_tokens(extra)

        add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        special_ids = [(t, backend.token_to_id(t)) for t in [bos] * add_bos + [eos] * add_eos if t is not None]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)

        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            unk_token=unk,
            chat_template=template if isinstance(template, str) else None,
        )


GGUF_TOKENIZER_MODELS = ("gpt2", "llama")  # tokenizer.ggml.model values from_gguf builds


def check_gguf_model(meta: dict[str, Any]) -> None:
    """Raises NotImplementedError unless from_gguf builds the tokenizer model the metadata names."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in GGUF_TOKENIZER_MODELS:
        raise NotImplementedError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )


# Limits of one chat-template rendering (see Tokenizer.apply_chat_template).
TEMPLATE_MAX_RANGE = 10_000  # items of one range()
TEMPLATE_MAX_STEPS = 1_000_000  # loop iterations, calls (4 steps each), intercepted operators, generator items
TEMPLATE_MAX_CHARS = 4 << 20  # the size of any value (see _size), the output included
TEMPLATE_MAX_INT_BITS = 1 << 14  # integers (4932 digits: past what Python prints)
TEMPLATE_MAX_VALUES = 100_000  # lists, tuples and dicts whose size one rendering remembers
TEMPLATE_MAX_BUILT = 16  # all the values one rendering builds, together: 16x the size limit


class _Render:
    """The budget of the rendering running in this context."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.steps = 0
        self.built = 0  # the sizes of the values built so far, together
        # id -> (value, size) of each list, tuple and dict sized so far; the value is kept so that
        # its id stays its own (the template cannot change a list or dict: the sandbox is immutable)
        self.sizes: dict[int, tuple[Any, int]] = {}
        self.namespaces: dict[int, tuple[Any, dict[str, int]]] = {}  # id -> (namespace, size of each attribute)


_RENDER: contextvars.ContextVar[_Render | None] = contextvars.ContextVar("cepe_template_render", default=None)


def _budget() -> _Render:
    r = _RENDER.get()
    return r if r is not None else _Render(TEMPLATE_MAX_CHARS)


def _refuse(message: str) -> Exception:
    from jinja2.sandbox import SecurityError

    return SecurityError(message)


def _step(n: int = 1) -> None:
    r = _RENDER.get()
    if r is not None:
        r.steps += n
        if r.steps > TEMPLATE_MAX_STEPS:
            raise _refuse(f"the template takes more than {TEMPLATE_MAX_STEPS} steps (loop iterations and calls)")


def _size(value: Any) -> int:
    """What printing, serializing, comparing or hashing `value` may cost, in characters: a string
    its length, an int its digits, a float 24, a list, tuple or dict 1 + the sizes of its items
    (remembered, so that a list holding the same list twice costs that list twice without walking
    it again: nesting cannot hide an exponential size), a namespace its attributes'. A list or dict
    may not hold a namespace (the one mutable value a template makes), so a remembered size stays true."""
    if isinstance(value, str):
        return len(value) + 1
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):
        return 1 + value.bit_length() // 3
    if isinstance(value, float):
        return 24
    if isinstance(value, _namespace_class()):
        return 1 + sum(_budget().namespaces.get(id(value), (None, {}))[1].values())
    if not isinstance(value, (list, tuple, dict)):
        return 1
    r = _budget()
    known = r.sizes.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    total = 1
    for item in value.items() if isinstance(value, dict) else value:
        for part in item if isinstance(value, dict) else (item,):
            if isinstance(part, _namespace_class()):
                raise _refuse("the template puts a namespace() in a list, tuple or dict")
            total += _size(part)
    if len(r.sizes) >= TEMPLATE_MAX_VALUES:
        raise _refuse(f"the template builds more than {TEMPLATE_MAX_VALUES} lists and dicts")
    r.sizes[id(value)] = (value, total)
    return total


def _chars(value: Any) -> int:
    """A string's length, any other value's size (_size)."""
    return len(value) if isinstance(value, str) else _size(value)


def _sized(value: Any, what: str = "a value") -> Any:
    """value, refused when its size (_size) is past the limit, or when with it the values this
    rendering built pass TEMPLATE_MAX_BUILT times the limit (so that time is bounded too: every
    step may build a value of the limit's size); a generator, wrapped to charge what it yields."""
    r = _budget()
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > TEMPLATE_MAX_INT_BITS:
        raise _refuse(f"the template builds an integer of {value.bit_length()} bits, more than {TEMPLATE_MAX_INT_BITS}")
    n = _chars(value)
    if n > r.limit:
        kind = "length" if isinstance(value, str) else "size"
        raise _refuse(f"the template builds {what} of {kind} {n}, more than the limit of {r.limit}")
    _charge(r, n)
    if isinstance(value, types.GeneratorType):
        return _Charged(value)
    return value


def _charge(r: _Render, n: int) -> None:
    r.built += n
    if r.built > TEMPLATE_MAX_BUILT * r.limit:
        raise _refuse(f"the template builds values of more than {TEMPLATE_MAX_BUILT * r.limit} characters in all")


def _remember(value: Any, size: int) -> None:
    """Records the size of a list or tuple made from parts of known size (a + b, a * n), so that
    it is not walked item by item."""
    r = _budget()
    if isinstance(value, (list, tuple)) and len(r.sizes) < TEMPLATE_MAX_VALUES:
        r.sizes[id(value)] = (value, size)


def _check_args(args: Sequence[Any]) -> None:
    """Refuses an int argument no sane template passes (a width or count past the size limit)."""
    limit = _budget().limit
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise _refuse(f"the template passes {a} to a call, more than the limit of {limit}")


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        n = text.count(old) if old else len(text) + 1
        _sized_len(len(text) + n * (len(new) - len(old)), "a replaced string")


def _check_join(sep: Any, items: Any) -> None:
    if isinstance(items, (list, tuple)):
        total = sum(len(x) if isinstance(x, str) else _size(x) for x in items)
        _sized_len(total + len(str(sep)) * max(len(items) - 1, 0), "a joined string")


def _check_format(fmt: str, args: Any = ()) -> None:
    """Refuses a format string with a width or precision of 10**7 or more, or one whose fields
    would copy its arguments past the size limit ("{0}{0}{0}..." of a long string)."""
    if re.search(r"\d{8,}", fmt):
        raise _refuse("the template formats with a width of 10**7 or more")
    values = (
        list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, (list, tuple)) else [args]
    )
    if values:
        fields = fmt.count("{") + fmt.count("%")
        _sized_len(len(fmt) + fields * max(_chars(v) for v in values), "a formatted string")


def _check_indent(text: Any, width: Any) -> None:
    if isinstance(text, str):
        w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
        _sized_len(len(text) + (text.count("\n") + 1) * max(w, 0), "an indented string")


def _check_wordwrap(text: Any, width: Any, wrapstring: Any) -> None:
    if isinstance(text, str) and isinstance(wrapstring, str):
        w = width if isinstance(width, int) and not isinstance(width, bool) and width > 0 else 1
        lines = len(text) // w + text.count(" ") + text.count("\n") + 1
        _sized_len(len(text) + lines * len(wrapstring), "a wrapped string")


def _check_str_method(owner: str, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Sequence[Any]:
    """The checks of str methods that can build more than their size arguments say; returns the
    arguments (a generator passed to join, made a list)."""
    if name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1])
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], str) else list(args[0])
        _check_join(owner, items)
        args = (items, *args[1:])
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _sized_len(len(owner) + owner.count("\t") * max(size, 0), "a string with tabs expanded")
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _sized_len(len(owner) * max(longest, 1), "a translated string")
    return args


def _sized_len(n: int, what: str) -> None:
    limit = _budget().limit
    if n > limit:
        raise _refuse(f"the template builds {what} of {n} characters, more than the limit of {limit}")


def _check_int_op(operator: str, left: Any, right: Any) -> None:
    """Refuses * and ** of integers whose result would pass TEMPLATE_MAX_INT_BITS (computing it
    could take minutes), before computing it."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    bits = 0
    if operator == "*":
        bits = left.bit_length() + right.bit_length()
    elif operator == "**" and right > 0 and abs(left) > 1:
        bits = min(right, TEMPLATE_MAX_INT_BITS + 1) * (left.bit_length() - 1)
    if bits > TEMPLATE_MAX_INT_BITS:
        raise _refuse(f"the template computes an integer of about {bits} bits, more than {TEMPLATE_MAX_INT_BITS}")


class _Counted:
    """A for-loop's iterable, counting its iterations against the budget."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            _step()
            yield item

    def __len__(self) -> int:
        return len(self.items)


class _Charged:
    """A generator a filter or call returned (map, select, batch, ...): each item it yields costs
    steps by its size, so what a consumer (list, join, sort) gathers from it stays bounded."""

    def __init__(self, gen: Any) -> None:
        self.gen = gen

    def __iter__(self) -> Iterator[Any]:
        for item in self.gen:
            _step()
            _charge(_budget(), _chars(item))
            yield item

    def __repr__(self) -> str:
        return repr(self.gen)


def _safe_range(*args: int) -> range:
    r = range(*args)
    if len(r) > TEMPLATE_MAX_RANGE:
        raise _refuse(f"range() of {len(r)} items, more than the limit of {TEMPLATE_MAX_RANGE}")
    return r


_NAMESPACE: Any = None


def _namespace_class() -> Any:
    """namespace(): jinja2's Namespace, with the size of each attribute tracked (and bounded)
    as it is set, and no namespace inside another."""
    global _NAMESPACE
    if _NAMESPACE is None:
        from jinja2.utils import Namespace

        def track(ns: Any, name: str, value: Any) -> None:
            if isinstance(value, Namespace):
                raise _refuse("the template puts a namespace() in a namespace")
            r = _budget()
            entry = r.namespaces.setdefault(id(ns), (ns, {}))
            entry[1][name] = _size(value)
            total = sum(entry[1].values())
            if total > r.limit:
                raise _refuse(f"the template builds a namespace of size {total}, more than the limit of {r.limit}")

        class TrackedNamespace(Namespace):
            def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own signature
                Namespace.__init__(*args, **kwargs)
                self = args[0]
                for name, value in object.__getattribute__(self, "_Namespace__attrs").items():
                    track(self, str(name), value)

            def __setitem__(self, name: str, value: Any) -> None:
                track(self, name, value)
                super().__setitem__(name, value)

        _NAMESPACE = TrackedNamespace
    return _NAMESPACE


def _lipsum(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> Any:  # noqa: A002 - jinja2's names
    """jinja2's lipsum(), refused when its n paragraphs of up to `max` words could pass the size limit."""
    from jinja2.utils import generate_lorem_ipsum

    if isinstance(n, int) and isinstance(max, int):
        _sized_len(builtins.max(n, 0) * builtins.max(max, 0) * 16, "lorem ipsum")
    return generate_lorem_ipsum(n, html, min, max)


_ENV: Any = None


def _environment() -> Any:
    """The jinja2 sandbox chat templates run in (made once)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    try:
        import jinja2
        import jinja2.ext
        from jinja2 import nodes
        from jinja2.compiler import CodeGenerator
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("chat templates need the 'jinja2' package: pip install jinja2") from exc

    class Generator(CodeGenerator):
        """Loops count their iterations; `a ~ b` results and list, tuple and dict literals are sized."""

        def visit_For(self, node: Any, frame: Any) -> None:
            node = copy.copy(node)
            node.iter = nodes.Call(
                nodes.EnvironmentAttribute("counted"), [node.iter], [], None, None, lineno=node.lineno
            )
            super().visit_For(node, frame)

        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.sized_concat(")
            super().visit_Concat(node, frame)
            self.write(")")

        def visit_List(self, node: Any, frame: Any) -> None:
            self.write("environment.sized_literal(")
            super().visit_List(node, frame)
            self.write(")")

        def visit_Dict(self, node: Any, frame: Any) -> None:
            self.write("environment.sized_literal(")
            super().visit_Dict(node, frame)
            self.write(")")

        def visit_Tuple(self, node: Any, frame: Any) -> None:
            if node.ctx != "load":  # a target of {% set a, b = ... %} or a loop
                super().visit_Tuple(node, frame)
                return
            self.write("environment.sized_literal(")
            super().visit_Tuple(node, frame)
            self.write(")")

    class Sandbox(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset({"+", "-", "*", "**", "%"})
        counted = staticmethod(_Counted)
        sized_concat = staticmethod(functools.partial(_sized, what="a string (~)"))
        sized_literal = staticmethod(functools.partial(_sized, what="a list, tuple or dict"))

        @staticmethod
        def concat(parts: Any) -> str:  # the output of a block, macro or {% set %} block
            parts = list(parts)
            _sized_len(sum(len(p) for p in parts), "a text block")
            return "".join(parts)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _step()
            if operator == "**" and isinstance(right, int) and abs(right) > 1024 and left not in (0, 1, -1):
                raise _refuse(f"the template raises to the power {right}")
            _check_int_op(operator, left, right)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        _sized_len(_chars(seq) * max(n, 0), "a repeated value")
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _sized_len(_chars(left) + _chars(right), "a concatenation")
            if operator == "%" and isinstance(left, str):
                items = right if isinstance(right, tuple) else (right,)
                _check_args(items)
                _check_format(left, right if isinstance(right, dict) else items)
            out = super().call_binop(context, operator, left, right)
            if isinstance(out, (list, tuple)):
                if operator == "+" and isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                    _remember(out, _size(left) + _size(right) - 1)
                elif operator == "*":
                    seq, n = (left, right) if isinstance(left, (list, tuple)) else (right, left)
                    _remember(out, (_size(seq) - 1) * max(n, 0) + 1)
            return _sized(out)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _step(4)
            _check_args([*args, *kwargs.values()])
            _sized_len(sum(_chars(a) for a in (*args, *kwargs.values())), "a call's arguments")
            owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
            if isinstance(owner, str):
                args = tuple(_check_str_method(owner, name, args, kwargs))
            return _sized(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def wrap_str_format(self, value: Any) -> Any:  # str.format / format_map, however reached
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            owner, name = value.__self__, value.__name__
            _check_format(owner)

            def checked(*args: Any, **kwargs: Any) -> str:
                _check_format(owner, [*args, *kwargs.values()] if name == "format" else (args[0] if args else {}))
                return wrapped(*args, **kwargs)

            return checked

    def guarded(name: str, f: Any) -> Any:
        @functools.wraps(f)
        def filter_(*args: Any, **kwargs: Any) -> Any:
            _step()
            _check_args([*args, *kwargs.values()])
            values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext))]
            values = [a for a in values if not isinstance(a, jinja2.Environment)]
            if name == "replace" and len(values) >= 3:
                _check_replace(values[0], values[1], values[2])
            elif name == "join" and values:
                items = values[0] if isinstance(values[0], str) else list(values[0])
                _check_join(values[1] if len(values) > 1 else kwargs.get("d", ""), items)
                args = tuple(items if a is values[0] else a for a in args)
            elif name == "format" and values and isinstance(values[0], str):
                _check_format(values[0], [*values[1:], *kwargs.values()])
            elif name == "indent" and values:
                _check_indent(values[0], values[1] if len(values) > 1 else kwargs.get("width", 4))
            elif name == "wordwrap" and values:
                width = values[1] if len(values) > 1 else kwargs.get("width", 79)
                _check_wordwrap(values[0], width, values[3] if len(values) > 3 else kwargs.get("wrapstring"))
            return _sized(f(*args, **kwargs), f"the result of the {name} filter")

        return filter_

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: guarded(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = _safe_range
    env.globals["namespace"] = _namespace_class()
    env.globals["lipsum"] = _lipsum
    _ENV = env
    return env


_TEMPLATES: dict[str, Any] = {}


def _compile(template: str) -> Any:
    """A chat template compiled in the sandbox (the last 16 are kept)."""
    if template in _TEMPLATES:
        return _TEMPLATES[template]
    compiled = _environment().from_string(template)
    if len(_TEMPLATES) < 16:
        _TEMPLATES[template] = compiled
    return compiled


def render_template(template: str, source: str, limit: int, **variables: Any) -> str:
    """A chat template rendered in the sandbox, within `limit` characters of
    output (and of any string it builds); every failure is a ValueError naming
    `source` (where the template comes from)."""
    token = _RENDER.set(_Render(limit))
    try:
        compiled = _compile(template)
        out: list[str] = []
        size = 0
        for piece in compiled.generate(**variables):
            size += len(piece)
            if size > limit:
                raise _refuse(f"its output exceeds the limit of {limit} characters")
            out.append(piece)
        return "".join(out)
    except MemoryError:
        raise MemoryError(f"{source}: out of memory rendering the template") from None
    except RecursionError:
        raise ValueError(f"{source}: the template recurses too deeply") from None
    except Exception as exc:  # noqa: BLE001 - a template is untrusted code: any failure is its own
        lineno = getattr(exc, "lineno", None)
        where = f" (line {lineno})" if lineno else ""
        kind = "" if type(exc).__name__ == "SecurityError" else f"{type(exc).__name__}: "
        raise ValueError(f"{source}{where}: {kind}{exc}") from None
    finally:
        _RENDER.reset(token)
