"""The text API: generate_text / perplexity_text / streaming / stop strings,
and CEPE contexts given as text, against the token-id API they wrap."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEXT

import cepe
from cepe.chunking import chunk_long_context, chunk_passages
from cepe.sampling import TEXT_DEFAULTS


@pytest.fixture(scope="module")
def cepe_text_model(cepe_text_dir):
    m = cepe.load(cepe_text_dir)
    m.chunk_len = 8
    return m


def test_tokenizer_matches_transformers(text_model):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(
        tokenizer_file=f"{text_model.path}/tokenizer.json", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok = text_model.tokenizer
    for s in ["the quick brown fox", "  spaces   and\ttabs ", "émigré naïve ☃", "", "the worm.</s>"]:
        assert tok.encode(s) == ref.encode(s)
        assert tok.decode(tok.encode(s)) == ref.decode(ref.encode(s), skip_special_tokens=True)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2


def test_generate_text_equals_the_id_api(text_model):
    tok = text_model.tokenizer
    prompt = "the early bird"
    ids = tok.encode(prompt)
    want = text_model.generate(np.array(ids), 20, eos_token_id=[], **TEXT_DEFAULTS)  # generate_text's defaults
    got = text_model.generate_text(prompt, max_new_tokens=20)
    expected = tok.decode([t for t in want.tolist()])
    # generation stops at eos (2) in the text API: compare up to it
    if 2 in want.tolist():
        expected = tok.decode(want[: want.tolist().index(2)].tolist())
    assert got == expected
    pieces = list(text_model.generate_text(prompt, max_new_tokens=20, stream=True))
    assert "".join(pieces) == got and len(pieces) >= 1


def test_stop_strings(text_model):
    full = text_model.generate_text("the quick", max_new_tokens=30)
    words = full.split()
    if len(words) < 3:
        pytest.skip("generation too short to cut")
    stop = words[2]
    cut = text_model.generate_text("the quick", max_new_tokens=30, stop=[stop])
    assert cut == full[: full.find(stop)]
    assert "".join(text_model.generate_text("the quick", max_new_tokens=30, stop=stop, stream=True)) == cut


def test_sampled_text_is_seeded(text_model):
    a = text_model.generate_text("a stitch", max_new_tokens=15, temperature=1.0, seed=3)
    b = text_model.generate_text("a stitch", max_new_tokens=15, temperature=1.0, seed=3)
    assert a == b


def test_perplexity_text(text_model):
    ids = text_model.tokenizer.encode(TEXT[:200])
    assert text_model.perplexity_text(TEXT[:200]) == pytest.approx(text_model.perplexity(np.array(ids)), rel=1e-6)


def test_cepe_text_contexts(cepe_text_model):
    m = cepe_text_model
    tok = m.tokenizer
    passages = ["the lazy dog", "all that glitters is not gold and never was", "smoke and fire"]
    ids, mask = chunk_passages([tok.encode(p, add_special_tokens=False) for p in passages], chunk_len=8, pad_id=2)
    prompt_ids = np.array(tok.encode("actions speak"))
    want = m.generate(
        prompt_ids, 12, eos_token_id=[2], encoder_input_ids=ids, encoder_attention_mask=mask, **TEXT_DEFAULTS
    )
    got = m.generate_text("actions speak", contexts=passages, max_new_tokens=12)
    assert got == tok.decode(want.tolist())
    long_ids, long_mask = chunk_long_context(tok.encode(TEXT, add_special_tokens=False), chunk_len=8, pad_id=2)
    ppl = m.perplexity_text("where there is smoke", context=TEXT)
    want_ppl = m.perplexity(
        np.array(tok.encode("where there is smoke")), encoder_input_ids=long_ids, encoder_attention_mask=long_mask
    )
    assert ppl == pytest.approx(want_ppl, rel=1e-6)
    # a budget left-truncates a long context
    m.max_context_tokens = 16
    try:
        short = m.perplexity_text("where there is smoke", context=TEXT)
        last = chunk_long_context(tok.encode(TEXT, add_special_tokens=False), chunk_len=8, pad_id=2, max_chunks=2)
        assert short == pytest.approx(
            m.perplexity(
                np.array(tok.encode("where there is smoke")), encoder_input_ids=last[0], encoder_attention_mask=last[1]
            )
        )
        with pytest.raises(ValueError, match="exceed the context budget"):
            m.generate_text("x", contexts=passages)
    finally:
        m.max_context_tokens = 0


def test_text_errors(tiny, text_model, cepe_text_model):
    no_tok = cepe.load(tiny[0])
    with pytest.raises(ValueError, match="has no tokenizer"):
        no_tok.generate_text("hello")
    with pytest.raises(ValueError, match="not a CEPE checkpoint"):
        text_model.generate_text("hello", context="some context")
    with pytest.raises(ValueError, match="either context .* or contexts"):
        cepe_text_model.generate_text("hello", context="a", contexts=["b"])
    with pytest.raises(TypeError, match="prompt must be a str"):
        text_model.generate_text(123)
    with pytest.raises(TypeError, match="contexts must be a list of strings"):
        cepe_text_model.generate_text("x", contexts="one string")


def test_sentencepiece_tokenizer_model(tmp_path):
    """tokenizer.model (LLaMA-2's SentencePiece format, trained here with
    LLaMA's settings) against the sentencepiece library that defines the
    format, with the HF Llama conventions: BOS prepended, special-token strings
    in the text mapped to their ids. (transformers 5 converts such files to a
    tokenizers BPE whose segmentation differs from sentencepiece's own.)"""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT.replace(". ", ".\n") + "\nnaïve émigré café ☃ 123 456\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        character_coverage=1.0,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )
    d = tmp_path / "model"
    d.mkdir()
    (tmp_path / "sp.model").rename(d / "tokenizer.model")
    from cepe.tokenizer import Tokenizer

    ours = Tokenizer.from_dir(d)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    for s in ["the quick brown fox", "  leading and   inner spaces", "naïve café ☃ ✓ 中文", "123 456", "", "a\nb\n"]:
        assert ours.encode(s, add_special_tokens=False) == sp.encode(s), s
        assert ours.encode(s) == [1] + sp.encode(s), s
        assert ours.decode(ours.encode(s)) == sp.decode(sp.encode(s)), s
    assert ours.encode("the</s>fox") == [1] + sp.encode("the") + [2] + sp.encode("fox")
    assert ours.decode(ours.encode("the</s>fox"), skip_special_tokens=False).startswith("<s>the</s>")
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2 and ours.vocab_size == 400
    (d / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the SentencePiece model"):
        Tokenizer.from_dir(d)
