"""Retrieval glue for RAG pipelines: passages, BM25 (bm25s) and dense
retrieval, behind one calling convention.

A retriever is any callable `retriever(query: str, k: int) -> list` whose
items are `Passage`s, plain strings or `(text, score)` pairs, so LangChain- or
LlamaIndex-style retrievers wrap in one line and `cepe.rag.answer` takes them
all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Passage:
    text: str
    score: float = 0.0
    index: int = -1  # position in the corpus the retriever was built on
    title: str = ""


class Retriever(Protocol):
    def __call__(self, query: str, k: int) -> list[Any]: ...


def _paragraphs(doc: str) -> list[str]:
    """A document's blocks: its paragraphs (split at blank lines), or, in a text without a
    blank line, its lines (a list of facts, one a line)."""
    blocks = re.split(r"\n[ \t\r\f\v]*\n", doc)
    return blocks if len(blocks) > 1 else doc.splitlines()


def split_passages(docs: str | Iterable[str], *, words: int = 100, stride: int | None = None) -> list[str]:
    """Splits documents into passages of at most `words` whitespace-separated words
    (DPR's 100-word passages), overlapping when stride < words. A passage never spans two
    paragraphs (blank-line separated), nor, in a text without blank lines, two lines: short
    one-line facts stay passages of their own."""
    if isinstance(words, bool) or not isinstance(words, int) or words < 1:
        raise ValueError(f"words must be an int >= 1, got {words!r}")
    stride = words if stride is None else stride
    if not 1 <= stride <= words:
        raise ValueError(f"stride must be in [1, words], got {stride}")
    out: list[str] = []
    for doc in [docs] if isinstance(docs, str) else docs:
        for block in _paragraphs(doc):
            toks = block.split()
            if not toks:
                continue
            starts = list(range(0, max(len(toks) - words, 0) + 1, stride))
            if starts[-1] + words < len(toks):  # the tail the stride would skip
                starts.append(len(toks) - words)
            out += [" ".join(toks[s : s + words]) for s in starts]
    return out


def _check_corpus(passages: Sequence[str]) -> list[str]:
    if isinstance(passages, str):
        raise TypeError("passages must be a list of strings, not one string (use split_passages)")
    items = list(passages)
    if not items:
        raise ValueError("the corpus is empty: nothing to retrieve from")
    if not all(isinstance(p, str) for p in items):
        raise TypeError("every passage must be a str")
    return items


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} is larger than the corpus ({n} passages)")


class BM25Retriever:
    """BM25 over a passage list, computed by bm25s (Lucene variant by default)."""

    def __init__(
        self,
        passages: Sequence[str],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | list[str] | None = None,
    ) -> None:
        try:
            import bm25s
        except ImportError:
            raise ImportError("BM25 retrieval needs the bm25s package: pip install bm25s") from None
        self.passages = _check_corpus(passages)
        self._bm25s = bm25s
        self.stopwords = stopwords
        self.index = bm25s.BM25(k1=k1, b=b, method=method)
        self.index.index(bm25s.tokenize(self.passages, stopwords=stopwords, show_progress=False), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for the query."""
        q = self._bm25s.tokenize([query], stopwords=self.stopwords, show_progress=False, return_ids=False)[0]
        if not q:  # no indexable word (e.g. "q?"): every passage scores 0 (bm25s itself fails on it)
            return np.zeros(len(self.passages))
        return np.asarray(self.index.get_scores(q), dtype=np.float64)

    def __call__(self, query: str, k: int = 10) -> list[Passage]:
        _check_k(k, len(self.passages))
        s = self.scores(query)
        order = np.lexsort((np.arange(len(s)), -s))[:k]  # by score, ties by corpus order
        return [Passage(self.passages[i], float(s[i]), int(i)) for i in order]


class DenseRetriever:
    """Inner-product (or cosine) search over passage embeddings.

    embed: a callable list[str] -> (n, d) array, or a cepe Model with a CEPE
    encoder and a tokenizer (mean of the encoder's states over real tokens).
    Search is brute force in NumPy, or FAISS (IndexFlatIP, the same exact
    scores) when installed and use_faiss is not False."""

    def __init__(
        self,
        passages: Sequence[str],
        embed: Callable[[list[str]], Any] | Any,
        *,
        normalize: bool = True,
        batch_size: int = 64,
        use_faiss: bool | None = None,
    ) -> None:
        self.passages = _check_corpus(passages)
        self.embed = _as_embedder(embed)
        self.normalize = normalize
        vecs = [
            np.asarray(self.embed(self.passages[i : i + batch_size]), dtype=np.float32)
            for i in range(0, len(self.passages), batch_size)
        ]
        self.vectors = self._prep(np.concatenate(vecs, axis=0))
        if self.vectors.shape[0] != len(self.passages):
            raise ValueError(f"embed returned {self.vectors.shape[0]} vectors for {len(self.passages)} passages")
        self._faiss = None
        if use_faiss is not False:
            try:
                import faiss

                self._faiss = faiss.IndexFlatIP(self.vectors.shape[1])
                self._faiss.add(self.vectors)
            except ImportError:
                if use_faiss:
                    raise ImportError("use_faiss=True but faiss is not installed: pip install faiss-cpu") from None

    def _prep(self, v: np.ndarray) -> np.ndarray:
        if v.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (n, d), got shape {v.shape}")
        if self.normalize:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(v, dtype=np.float32)

    def scores(self, query: str) -> np.ndarray:
        q = self._prep(np.asarray(self.embed([query]), dtype=np.float32))
        return (self.vectors @ q[0]).astype(np.float64)

    def __call__(self, query: str, k: int = 10) -> list[Passage]:
        _check_k(k, len(self.passages))
        if self._faiss is not None:
            q = self._prep(np.asarray(self.embed([query]), dtype=np.float32))
            s, idx = self._faiss.search(q, k)
            return [Passage(self.passages[i], float(x), int(i)) for x, i in zip(s[0], idx[0], strict=True)]
        s = self.scores(query)
        order = np.lexsort((np.arange(len(s)), -s))[:k]
        return [Passage(self.passages[i], float(s[i]), int(i)) for i in order]


def _as_embedder(embed: Any) -> Callable[[list[str]], np.ndarray]:
    if hasattr(embed, "encode") and hasattr(embed, "config") and getattr(embed.config, "encoder", None):
        return lambda texts: encoder_embeddings(embed, texts)
    if callable(embed):
        return embed
    raise TypeError("embed must be a callable list[str] -> (n, d) array, or a cepe Model with a CEPE encoder")


def encoder_embeddings(model: Any, texts: list[str], *, chunk_len: int = 256) -> np.ndarray:
    """Mean-pooled CEPE encoder states of each text (one chunk each, no BOS)."""
    from .chunking import chunk_passages

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer: dense retrieval with its encoder needs one")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids, mask = chunk_passages(
        [tok.encode(t, add_special_tokens=False) or [pad] for t in texts],
        chunk_len=chunk_len,
        pad_id=pad,
        truncation_side="right",
        padding_side="right",
    )
    states = model.encode(ids[:, None, :], mask[:, None, :])  # (n, L, d): each text its own row
    w = mask[..., None].astype(np.float32)
    return (states * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0)


def as_passages(items: Iterable[Any]) -> list[Passage]:
    """Normalises what any retriever returned into Passages."""
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Passage):
            out.append(it)
        elif isinstance(it, str):
            out.append(Passage(it, 0.0, i))
        elif isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[0], str):
            out.append(Passage(it[0], float(it[1]), i))
        elif hasattr(it, "page_content"):  # LangChain Document
            out.append(Passage(str(it.page_content), float(getattr(it, "score", 0.0) or 0.0), i))
        elif hasattr(it, "text"):
            out.append(Passage(str(it.text), float(getattr(it, "score", 0.0) or 0.0), i))
        else:
            raise TypeError(f"a retriever returned {type(it).__name__}; expected Passage, str or (text, score)")
    return out
