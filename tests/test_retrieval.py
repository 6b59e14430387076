"""Chunking policies, BM25 and dense retrieval, and the RAG protocol."""

from __future__ import annotations

import numpy as np
import pytest

from cepe import rag
from cepe.chunking import chunk_long_context, chunk_passages, unchunk
from cepe.retrieval import BM25Retriever, DenseRetriever, Passage, as_passages, split_passages

CORPUS = [
    "The cat sat on the mat and purred at the morning sun.",
    "Dogs are loyal companions and love long walks in the park.",
    "The Eiffel Tower is in Paris, the capital of France.",
    "Paris hosted the Olympic Games in 1900, 1924 and 2024.",
    "A cat and a dog can live together peacefully in one house.",
    "Mount Everest is the highest mountain above sea level.",
    "The Seine river flows through Paris before reaching the sea.",
]


# ------------------------------------------------------------------ chunking
@pytest.mark.parametrize("n", [1, 7, 8, 9, 40])
def test_long_context_round_trips(n):
    ids = np.arange(100, 100 + n)
    chunks, mask = chunk_long_context(ids, chunk_len=8, pad_id=2)
    assert chunks.shape == mask.shape == (-(-n // 8), 8)
    assert sum(unchunk(chunks, mask), []) == ids.tolist()
    assert (mask[1:] == 1).all()  # only the first chunk is padded ...
    first = mask[0]
    assert (np.diff(first) >= 0).all()  # ... on the left
    assert (chunks[mask == 0] == 2).all()


def test_long_context_left_truncation():
    ids = np.arange(100, 140)
    chunks, mask = chunk_long_context(ids, chunk_len=8, pad_id=2, max_chunks=3)
    assert chunks.shape == (3, 8) and mask.all()
    assert sum(unchunk(chunks, mask), []) == ids[-24:].tolist()  # the most recent tokens survive


@pytest.mark.parametrize("trunc", ["left", "right"])
@pytest.mark.parametrize("padside", ["left", "right"])
def test_passages_one_chunk_each(trunc, padside):
    passages = [[5, 6, 7], list(range(10, 22)), [9]]
    chunks, mask = chunk_passages(passages, chunk_len=8, pad_id=0, truncation_side=trunc, padding_side=padside)
    back = unchunk(chunks, mask)
    assert back[0] == [5, 6, 7] and back[2] == [9]
    assert back[1] == (list(range(14, 22)) if trunc == "left" else list(range(10, 18)))
    real = mask[0].astype(bool)
    assert real[-1] if padside == "left" else real[0]


def test_chunking_errors():
    with pytest.raises(ValueError, match="the context is empty"):
        chunk_long_context([], pad_id=0)
    with pytest.raises(ValueError, match="chunk_len must be an int >= 1"):
        chunk_long_context([1, 2], chunk_len=0, pad_id=0)
    with pytest.raises(ValueError, match="no passages"):
        chunk_passages([], pad_id=0)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        chunk_passages([[1]], pad_id=0, padding_side="middle")


def test_split_passages():
    words = " ".join(f"w{i}" for i in range(25))
    assert split_passages(words, words=10) == [
        " ".join(f"w{i}" for i in range(0, 10)),
        " ".join(f"w{i}" for i in range(10, 20)),
        " ".join(f"w{i}" for i in range(15, 25)),
    ]
    assert len(split_passages([words, "short doc"], words=10, stride=5)) == 5
    with pytest.raises(ValueError, match="stride must be in"):
        split_passages(words, words=10, stride=11)


# --------------------------------------------------------------------- BM25
@pytest.mark.parametrize("query", ["cat and dog", "Paris France capital", "highest mountain", "river sea"])
def test_bm25_ranks_equal_bm25s(query):
    bm25s = pytest.importorskip("bm25s")
    ours = BM25Retriever(CORPUS)(query, k=4)
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(CORPUS, stopwords=None, show_progress=False), show_progress=False)
    docs, scores = ref.retrieve(bm25s.tokenize([query], stopwords=None, show_progress=False), k=4, show_progress=False)
    np.testing.assert_allclose([p.score for p in ours], scores[0], rtol=1e-6)
    hits = scores[0] > 0  # zero-score passages tie; bm25s leaves their order unspecified
    assert hits.any()
    assert [p.index for p in ours][: hits.sum()] == docs[0][hits].tolist()


def test_retrieval_errors():
    with pytest.raises(ValueError, match="the corpus is empty"):
        BM25Retriever([])
    with pytest.raises(ValueError, match="k=8 is larger than the corpus"):
        BM25Retriever(CORPUS)("cat", k=8)
    with pytest.raises(TypeError, match="not one string"):
        BM25Retriever("one long string")


# -------------------------------------------------------------------- dense
def hashed_bow(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in embedding: hashed bag of words."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, sum(map(ord, w.strip(".,"))) % 64] += 1.0
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_dense_equals_brute_force(normalize):
    r = DenseRetriever(CORPUS, hashed_bow, normalize=normalize, use_faiss=False, batch_size=3)
    query = "a cat in Paris"
    V = hashed_bow(CORPUS).astype(np.float64)
    q = hashed_bow([query])[0].astype(np.float64)
    if normalize:
        V /= np.linalg.norm(V, axis=1, keepdims=True)
        q /= np.linalg.norm(q)
    want = V @ q
    got = r(query, k=len(CORPUS))
    assert [p.index for p in got] == sorted(range(len(CORPUS)), key=lambda i: (-want[i], i))
    np.testing.assert_allclose([p.score for p in got], np.sort(want)[::-1], rtol=1e-5)


def test_any_callable_is_a_retriever():
    items = as_passages(["plain text", ("pair", 0.5), Passage("p", 1.0, 3)])
    assert [p.text for p in items] == ["plain text", "pair", "p"]
    with pytest.raises(TypeError, match="expected Passage, str or"):
        as_passages([42])


# ---------------------------------------------------------------------- RAG
class FakeModel:
    """Records what rag.answer hands to the model."""

    class config:  # noqa: N801
        is_cepe = True

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate_text(self, prompt: str, **kw) -> str:
        self.calls.append({"prompt": prompt, **kw})
        return " Paris\n"


class PlainModel(FakeModel):
    class config:  # noqa: N801
        is_cepe = False


def test_bm25_query_without_words_scores_zero():
    r = BM25Retriever(CORPUS)
    assert [p.index for p in r("q?", 3)] == [0, 1, 2] and all(p.score == 0 for p in r("?!", 3))


def test_rag_clamps_k_to_the_corpus_with_a_warning():
    model = FakeModel()
    with pytest.warns(UserWarning, match=f"20 passages asked for, but the corpus has {len(CORPUS)}: using them all"):
        out = rag.answer("Where is the Eiffel Tower?", CORPUS, model=model)  # 10 + 10 by default
    ranked = BM25Retriever(CORPUS)("Where is the Eiffel Tower?", k=len(CORPUS))
    assert [p.text for p in out.in_decoder + out.in_encoder] == [p.text for p in ranked]


def test_rag_without_cepe_puts_nothing_in_an_encoder():
    model = PlainModel()
    out = rag.answer("Where is the Eiffel Tower?", CORPUS, in_decoder=2, model=model)
    assert out.in_encoder == [] and model.calls[0]["contexts"] is None
    assert [p.text for p in out.in_decoder] == [p.text for p in BM25Retriever(CORPUS)("Where is the Eiffel Tower?", 2)]


def test_split_passages_keeps_one_line_facts_apart():
    facts = "Paris is the capital of France.\nThe Nile is a river in Africa.\n\nMount Everest is the highest mountain."
    # blank lines present: paragraphs are the units, so the first two lines form one passage
    assert split_passages(facts) == [
        "Paris is the capital of France. The Nile is a river in Africa.",
        "Mount Everest is the highest mountain.",
    ]
    lines = facts.replace("\n\n", "\n")  # no blank line: one fact a line
    assert split_passages(lines) == [ln for ln in lines.splitlines()]
    long_para = " ".join(f"w{i}" for i in range(15)) + "\n\nshort one"
    assert split_passages(long_para, words=10) == [
        " ".join(f"w{i}" for i in range(10)),
        " ".join(f"w{i}" for i in range(5, 15)),
        "short one",
    ]


def test_rag_protocol_top_in_decoder_next_in_encoder():
    model = FakeModel()
    out = rag.answer("Where is the Eiffel Tower?", CORPUS, in_decoder=2, in_encoder=3, model=model)
    ranked = BM25Retriever(CORPUS)("Where is the Eiffel Tower?", k=5)
    assert out.text == "Paris"
    assert [p.text for p in out.in_decoder] == [p.text for p in ranked[:2]]
    assert [p.text for p in out.in_encoder] == [p.text for p in ranked[2:5]]
    call = model.calls[0]
    assert call["contexts"] == [p.text for p in ranked[2:5]]
    assert call["stop"] == ["\n"] and call["max_new_tokens"] == 25
    assert call["prompt"].endswith("Question: Where is the Eiffel Tower?\nAnswer:")
    assert call["prompt"].startswith(f"Document: {ranked[0].text}")
    # any callable retriever works
    out2 = rag.answer("q?", lambda q, k: [("a", 1.0), ("b", 0.5)], in_decoder=1, in_encoder=1, model=model)
    assert [p.text for p in out2.in_decoder] == ["a"] and [p.text for p in out2.in_encoder] == ["b"]


def test_rag_demonstrations_go_to_one_encoder_chunk_when_the_encoder_is_used():
    demos = [("Capital of Italy?", "Rome"), ("Longest river?", "The Nile")]
    shots = "Question: Capital of Italy?\nAnswer: Rome\n\nQuestion: Longest river?\nAnswer: The Nile"
    model = FakeModel()
    out = rag.answer("q?", lambda q, k: [("a", 1.0), ("b", 0.5)], in_decoder=1, in_encoder=1, model=model, demos=demos)
    assert out.demos_in_encoder and model.calls[0]["contexts"] == ["b", shots]
    assert model.calls[0]["prompt"] == "Document: a\n\nQuestion: q?\nAnswer:"
    plain = PlainModel()  # no encoder: the demonstrations stay in the prompt, after the documents
    out = rag.answer("q?", lambda q, k: [("a", 1.0)], in_decoder=1, model=plain, demos=demos)
    assert not out.demos_in_encoder and plain.calls[0]["contexts"] is None
    assert plain.calls[0]["prompt"] == f"Document: a\n\n{shots}\n\nQuestion: q?\nAnswer:"


def test_rag_errors():
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        rag.answer("  ", CORPUS, model=FakeModel())
    with pytest.raises(ValueError, match="the corpus is empty"):
        rag.answer("q", [], model=FakeModel())
    with pytest.raises(ValueError, match="in_encoder > 0 needs a CEPE model"):
        rag.answer("q", CORPUS, in_encoder=1, model=PlainModel())
