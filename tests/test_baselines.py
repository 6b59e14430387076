"""Training-free baselines composed from cepe.ops (cepe.baselines), each
against a PyTorch reference written here from its paper, on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import cepe
import cepe.eval as ev
from cepe.baselines import OpsDecoder


@torch.no_grad()
def torch_streaming_nll(hf, ids: np.ndarray, cache_size: int, scored: int, sinks: int = 4) -> float:
    """StreamingLLM (Xiao et al. 2023, with its position shift): token by token, a cache of the
    first `sinks` tokens and the most recent others; keys kept before RoPE and rotated by their
    slot in the cache, the query by the last slot."""
    model, cfg = hf.model, hf.config
    H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.head_dim
    K: list[list[torch.Tensor]] = [[] for _ in model.layers]
    V: list[list[torch.Tensor]] = [[] for _ in model.layers]
    nll = []
    for t in range(len(ids) - 1):
        h = model.embed_tokens(torch.tensor([[int(ids[t])]]))
        for i, layer in enumerate(model.layers):
            if len(K[i]) == cache_size:
                del K[i][sinks], V[i][sinks]
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = att.q_proj(x).view(1, 1, H, hd).transpose(1, 2)
            K[i].append(att.k_proj(x).view(1, 1, KVH, hd).transpose(1, 2))
            V[i].append(att.v_proj(x).view(1, 1, KVH, hd).transpose(1, 2))
            ks, vs = torch.cat(K[i], dim=2), torch.cat(V[i], dim=2)
            S = ks.shape[2]
            cos, sin = model.rotary_emb(vs, torch.arange(S)[None])
            qr, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
            _, kr = apply_rotary_pos_emb(ks, ks, cos, sin)
            p = torch.softmax(qr @ repeat_kv(kr, H // KVH).transpose(2, 3) / math.sqrt(hd), dim=-1)
            a = p @ repeat_kv(vs, H // KVH)
            h = h + att.o_proj(a.transpose(1, 2).reshape(1, 1, H * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if t + 1 >= len(ids) - scored:
            logp = torch.log_softmax(hf.lm_head(model.norm(h))[0, -1].double(), -1)
            nll.append(-float(logp[int(ids[t + 1])]))
    return float(np.mean(nll))


@pytest.mark.parametrize("cache_size,sinks", [(12, 4), (9, 1), (6, 0)])
def test_streaming_matches_the_torch_reference(tiny_llama, cache_size, sinks):
    hf = LlamaForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32).eval()
    dec = OpsDecoder.from_model(tiny_llama.load())
    ids = np.random.default_rng(cache_size).integers(3, 101, size=30)
    got = dec.streaming_nll(ids, cache_size=cache_size, scored=11, sinks=sinks)
    assert got == pytest.approx(torch_streaming_nll(hf, ids, cache_size, 11, sinks), abs=1e-4)


def test_streaming_without_eviction_is_the_engines_forward(tiny_llama):
    model = tiny_llama.load()
    dec = OpsDecoder.from_model(model)
    ids = np.random.default_rng(5).integers(3, 101, size=25)
    assert dec.streaming_nll(ids, cache_size=25, scored=10) == pytest.approx(
        math.log(model.perplexity(ids, eval_window=10)), abs=1e-5
    )
    with pytest.raises(ValueError, match="sinks"):
        dec.streaming_nll(ids, cache_size=4, scored=3, sinks=4)
    with pytest.raises(ValueError, match="scored"):
        dec.streaming_nll(ids, cache_size=8, scored=25)


@pytest.mark.cepe_config(hidden_size=64, intermediate_size=128)
def test_ops_decoder_of_a_model_held_in_q8_0_runs_on_its_widened_weights(tiny_llama):
    """A model whose matrices stay in a block format: the baselines run on them widened
    (exactly gguf's dequantization), so they agree with the float32 model of those weights."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    q8 = OpsDecoder.from_model(cepe.load(tiny_llama.path, dtype="q8_0"))
    f32 = OpsDecoder.from_model(tiny_llama.load())
    name = "model.layers.0.mlp.down_proj.weight"
    want = dequantize(quantize(f32.w[name], GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(q8.w[name], want)
    ids = np.random.default_rng(6).integers(3, 101, size=20)
    assert q8.streaming_nll(ids, cache_size=20, scored=8) == pytest.approx(
        f32.streaming_nll(ids, cache_size=20, scored=8), abs=2e-2
    )


def test_streaming_in_the_lm_protocol(tiny_cepe):
    """--method streaming: x[-W-N:] streamed through a W-entry cache; at N = 0 it is truncation."""
    model = tiny_cepe.load()
    W = 12
    docs = [np.random.default_rng(d).integers(3, 101, size=W + 256 + d) for d in range(2)]
    result = ev.evaluate_lm(model, docs, window=W, contexts=[0, 256], methods=["truncation", "streaming"], bootstrap=50)
    trunc, stream = result["results"]["truncation"], result["results"]["streaming"]
    assert stream[0]["nll_per_doc"] == trunc[0]["nll_per_doc"]
    dec = OpsDecoder.from_model(model)
    for d, x in enumerate(docs):
        want = dec.streaming_nll(x[-W - 256 :], cache_size=W, scored=W - 1)
        assert stream[1]["nll_per_doc"][d] == pytest.approx(want, abs=1e-9)
    assert stream[1]["nll_per_doc"] != trunc[1]["nll_per_doc"]


@torch.no_grad()
def torch_replug_nll(hf, passages, ids: np.ndarray, scored: int, scores=None) -> float:
    """REPLUG (Shi et al. 2023): p(y) = sum_k softmax(scores)_k p(y | passage_k ++ x)."""
    w = torch.full((len(passages),), 1.0 / len(passages)) if scores is None else torch.softmax(torch.tensor(scores), 0)
    probs = 0
    for p, wk in zip(passages, w, strict=True):
        seq = torch.as_tensor(np.concatenate([p, ids]))[None]
        logits = hf(seq).logits[0].double()
        logp = torch.log_softmax(logits[-scored - 1 : -1], -1)
        probs = probs + wk.double() * logp[torch.arange(scored), torch.as_tensor(ids[-scored:])].exp()
    return float(-torch.log(probs).mean())


@pytest.mark.parametrize("scores", [None, [0.5, -1.0, 2.0]])
def test_replug_matches_the_torch_reference(tiny_llama, scores):
    from cepe.baselines import replug_nll

    hf = LlamaForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32).eval()
    rng = np.random.default_rng(7)
    passages = [rng.integers(3, 101, size=n) for n in (5, 9, 7)]
    ids = rng.integers(3, 101, size=14)
    got = replug_nll(tiny_llama.load(), passages, ids, scored=10, scores=scores)
    assert got == pytest.approx(torch_replug_nll(hf, passages, ids, 10, scores), abs=1e-4)
    with pytest.raises(ValueError, match="scores"):
        replug_nll(tiny_llama.load(), passages, ids, scored=10, scores=[1.0])


def lm_protocol(model, method: str, seed: int, W: int):
    """evaluate_lm over two random documents with truncation and method, window W, at 0 and 512
    context tokens -> (docs, method's results); with no context the method scores as truncation does."""
    docs = [np.random.default_rng(seed + d).integers(3, 101, size=W + 512) for d in range(2)]
    result = ev.evaluate_lm(model, docs, window=W, contexts=[0, 512], methods=["truncation", method], bootstrap=50)
    trunc, res = result["results"]["truncation"], result["results"][method]
    assert res[0]["nll_per_doc"] == trunc[0]["nll_per_doc"]
    return docs, res


def test_replug_in_the_lm_protocol(tiny_cepe):
    from cepe.baselines import replug_nll

    model = tiny_cepe.load()
    W = 12
    docs, rep = lm_protocol(model, "replug", seed=10, W=W)
    for d, x in enumerate(docs):
        chunks = [x[-W - 512 : -W - 256], x[-W - 256 : -W]]
        assert rep[1]["nll_per_doc"][d] == pytest.approx(replug_nll(model, chunks, x[-W:], W - 1), abs=1e-9)


def nll_of(logits: torch.Tensor, ids: np.ndarray, scored: int) -> float:
    """Mean NLL of the last `scored` of ids under their logits (T, V)."""
    T = len(ids)
    logp = torch.log_softmax(logits.double(), -1)
    return float(-logp[torch.arange(T - scored - 1, T - 1), torch.as_tensor(ids[-scored:])].mean())


@torch.no_grad()
def torch_pcw_logits(hf, windows, ids: np.ndarray) -> torch.Tensor:
    """Parallel context windows (Ratner et al. 2023) as one sequence with a block mask: window i
    at positions 0..L_i-1 sees its own earlier tokens; the task tokens, at positions from the
    longest window's length on, see every window token and their own earlier tokens. The task
    tokens' logits (T, V)."""
    windows = [np.asarray(w) for w in windows]
    n, longest, T = len(windows), max(len(w) for w in windows), len(ids)
    seq = torch.as_tensor(np.concatenate([*windows, ids]))[None]
    pos = torch.as_tensor(np.concatenate([*(np.arange(len(w)) for w in windows), longest + np.arange(T)]))[None]
    S = seq.shape[1]
    owner = torch.as_tensor(np.concatenate([*(np.full(len(w), i) for i, w in enumerate(windows)), np.full(T, n)]))
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = (j <= i) & ((owner[:, None] == owner[None, :]) | ((owner[:, None] == n) & (owner[None, :] < n)))
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    model = hf.model
    h = model.embed_tokens(seq)
    cos_sin = model.rotary_emb(h, pos)
    for layer in model.layers:
        a, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=mask)
        h = h + a
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hf.lm_head(model.norm(h))[0, S - T :]


def test_pcw_matches_the_torch_reference(tiny_llama):
    hf = LlamaForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"
    dec = OpsDecoder.from_model(tiny_llama.load())
    rng = np.random.default_rng(11)
    chunks, ids = rng.integers(3, 101, size=(3, 8)), rng.integers(3, 101, size=13)
    got = dec.pcw_nll(chunks, ids, scored=12)
    assert got == pytest.approx(nll_of(torch_pcw_logits(hf, chunks, ids), ids, 12), abs=1e-4)
    # windows of different lengths: the task tokens follow the longest
    windows = [rng.integers(3, 101, size=n) for n in (5, 9, 7)]
    got_logits = dec.pcw_logits(dec.pcw_windows(windows), ids)
    np.testing.assert_allclose(got_logits, torch_pcw_logits(hf, windows, ids).numpy(), atol=2e-4)
    assert dec.pcw_logits(dec.pcw_windows(windows), ids, last=True) == pytest.approx(got_logits[-1], abs=1e-5)
    past: list = []  # token by token after a first part: the same logits
    win = dec.pcw_windows(windows)
    steps = [dec.pcw_logits(win, ids[:6], past=past)] + [dec.pcw_logits(win, [t], past=past) for t in ids[6:]]
    np.testing.assert_allclose(np.concatenate(steps), got_logits, atol=1e-5)
    # one window is plain causal attention over chunk + tokens: the engine's forward
    model = tiny_llama.load()
    one = dec.pcw_nll(chunks[:1], ids, scored=12)
    assert one == pytest.approx(math.log(model.perplexity(np.concatenate([chunks[0], ids]), eval_window=12)), abs=1e-5)
    with pytest.raises(ValueError, match="chunks"):
        dec.pcw_nll(chunks[0], ids, scored=12)


def test_pcw_in_the_lm_protocol(tiny_cepe):
    model = tiny_cepe.load()
    W = 12
    docs, pcw = lm_protocol(model, "pcw", seed=20, W=W)
    dec = OpsDecoder.from_model(model)
    for d, x in enumerate(docs):
        want = dec.pcw_nll(x[-W - 512 : -W].reshape(2, 256), x[-W:], W - 1)
        assert pcw[1]["nll_per_doc"][d] == pytest.approx(want, abs=1e-9)


def test_e2llm_cepe_in_the_lm_protocol_matches_the_reference(tiny_cepe, reference):
    """e2llm-cepe: the decoder reads the last 2W tokens with RoPE scaled linearly by 2, the rest of
    the context through the encoder; the reference runs the same with transformers' linear RoPE."""
    W = 256
    ref = reference.load_reference(tiny_cepe.path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = tiny_cepe.load()
    docs = [np.random.default_rng(30 + d).integers(3, 101, size=W + 768) for d in range(2)]
    result = ev.evaluate_lm(model, docs, window=W, contexts=[0, 256, 768], methods=["e2llm-cepe"], bootstrap=50)
    rows = {r["N"]: r for r in result["results"]["e2llm-cepe"]}
    for d, x in enumerate(docs):
        for n, (dec_len, n_ctx) in {0: (W, 0), 256: (W + 256, 0), 768: (2 * W, 512)}.items():
            dec = x[-dec_len:]
            E = None if not n_ctx else ref.encode(x[-dec_len - n_ctx : -dec_len].reshape(1, -1, 256))
            logp = torch.log_softmax(ref.forward(dec[None], E)[0].double()[-W:-1], -1)
            want = float(-logp[torch.arange(W - 1), torch.as_tensor(dec[-(W - 1) :])].mean())
            assert rows[n]["nll_per_doc"][d] == pytest.approx(want, abs=1e-4), (d, n)
    unscaled = math.log(model.perplexity(docs[0][-W:], eval_window=W - 1))
    assert abs(rows[0]["nll_per_doc"][0] - unscaled) > 1e-3  # the scale is in effect
    with pytest.raises(ValueError, match="multiple of 256"):
        ev.evaluate_lm(model, docs, window=100, contexts=[256], methods=["e2llm-cepe"])


@torch.no_grad()
def torch_ape_logits(hf, prefix, windows, ids, temp: float, scale: float) -> torch.Tensor:
    """APE (Yang et al. 2025) written out: every window after the same prefix (positions 0..P-1,
    window i at P..P+L_i-1, causal within); the task tokens (from P + the longest L_i on) weigh
    the prefix's exp(score), the windows' exp(score / temp) times scale, and their own causal
    exp(score). The task tokens' logits (T, V)."""
    model, cfg = hf.model, hf.config
    H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    P, T = len(prefix), len(ids)
    longest = max(len(w) for w in windows)
    hc = [model.embed_tokens(torch.as_tensor(np.concatenate([prefix, w]).astype(np.int64))[None]) for w in windows]
    ht = model.embed_tokens(torch.as_tensor(ids)[None])
    cs_t = model.rotary_emb(ht, torch.arange(P + longest, P + longest + T)[None])
    sc = hd**-0.5

    def proj(layer, h, cs):
        B, S, _ = h.shape
        att, x = layer.self_attn, layer.input_layernorm(h)
        q = att.q_proj(x).view(B, S, H, hd).transpose(1, 2)
        k = att.k_proj(x).view(B, S, KVH, hd).transpose(1, 2)
        v = att.v_proj(x).view(B, S, KVH, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cs)
        return q, repeat_kv(k, H // KVH), repeat_kv(v, H // KVH)

    def finish(layer, h, a):
        h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(*h.shape[:2], H * hd))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    for layer in model.layers:
        kxs, vxs = [], []
        for w, h in enumerate(hc):
            S = h.shape[1]
            qc, kc, vc = proj(layer, h, model.rotary_emb(h, torch.arange(S)[None]))
            s = ((qc @ kc.transpose(2, 3)) * sc).masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), -1e30)
            hc[w] = finish(layer, h, torch.softmax(s, -1) @ vc)
            kp, vp = kc[:, :, :P], vc[:, :, :P]
            kxs.append(kc[:, :, P:])
            vxs.append(vc[:, :, P:])
        kx, vx = torch.cat(kxs, 2), torch.cat(vxs, 2)
        qt, kt, vt = proj(layer, ht, cs_t)
        s_p, s_x = (qt @ kp.transpose(2, 3)) * sc, (qt @ kx.transpose(2, 3)) * sc / temp
        s_t = ((qt @ kt.transpose(2, 3)) * sc).masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -1e30)
        m = torch.cat([s_p, s_x, s_t], -1).amax(-1, keepdim=True)
        e_p, e_x, e_t = (s_p - m).exp(), scale * (s_x - m).exp(), (s_t - m).exp()
        num = e_p @ vp + e_x @ vx + e_t @ vt
        at = num / (e_p.sum(-1, keepdim=True) + e_x.sum(-1, keepdim=True) + e_t.sum(-1, keepdim=True))
        ht = finish(layer, ht, at)
    return hf.lm_head(model.norm(ht))[0]


@pytest.mark.parametrize("temp,scale", [(1.0, 1.0), (0.7, 0.8)])
def test_ape_matches_the_torch_reference(tiny_llama, temp, scale):
    hf = LlamaForCausalLM.from_pretrained(tiny_llama.path, dtype=torch.float32).eval()
    dec = OpsDecoder.from_model(tiny_llama.load())
    rng = np.random.default_rng(12)
    prefix, chunks, ids = rng.integers(3, 101, size=3), rng.integers(3, 101, size=(3, 6)), rng.integers(3, 101, size=9)
    got = dec.pcw_nll(chunks, ids, scored=8, prefix=prefix, temperature=temp, scale=scale)
    assert got == pytest.approx(nll_of(torch_ape_logits(hf, prefix, chunks, ids, temp, scale), ids, 8), abs=1e-4)
    windows = [rng.integers(3, 101, size=n) for n in (4, 8, 2)]
    win = dec.pcw_windows(windows, prefix=prefix, temperature=temp, scale=scale)
    want = torch_ape_logits(hf, prefix, windows, ids, temp, scale).numpy()
    np.testing.assert_allclose(dec.pcw_logits(win, ids), want, atol=2e-4)
    if (temp, scale) != (1.0, 1.0):
        assert abs(got - dec.pcw_nll(chunks, ids, scored=8, prefix=prefix)) > 1e-4
    with pytest.raises(ValueError, match="temperature"):
        dec.pcw_nll(chunks, ids, scored=8, temperature=0.0)


def test_ape_in_the_lm_protocol_matches_the_reference_and_keys_its_settings(tiny_cepe, reference, tmp_path):
    """--method ape: x[-W:] after the context's 256-token chunks as APE windows; the per-document
    NLL is the torch reference's, the default settings are T = S = 1 after BOS, and the calls log
    keeps each setting's results apart."""
    hf = reference.load_reference(tiny_cepe.path).lm
    model = tiny_cepe.load()
    W = 12
    docs = [np.random.default_rng(40 + d).integers(3, 101, size=W + 512) for d in range(2)]
    settings = ev.APESettings(temperature=0.7, scale=0.8, prefix=(1, 9))
    log = tmp_path / "calls.jsonl"
    kw = dict(window=W, contexts=[0, 512], methods=["truncation", "ape"], bootstrap=50, log_path=log)
    result = ev.evaluate_lm(model, docs, ape=settings, **kw)
    assert result["ape"] == {"temperature": 0.7, "scale": 0.8, "prefix": [1, 9]}
    trunc, ape = result["results"]["truncation"], result["results"]["ape"]
    assert ape[0]["nll_per_doc"] == trunc[0]["nll_per_doc"]  # no context to place at N = 0
    for d, x in enumerate(docs):
        logits = torch_ape_logits(hf, np.array([1, 9]), x[-W - 512 : -W].reshape(2, 256), x[-W:], 0.7, 0.8)
        assert ape[1]["nll_per_doc"][d] == pytest.approx(nll_of(logits, x[-W:], W - 1), abs=1e-4)
    # the defaults on the same log: computed afresh (only truncation's calls are taken from it)
    default = ev.evaluate_lm(model, docs, **kw)
    assert default["ape"] == {"temperature": 1.0, "scale": 1.0, "prefix": [1]}
    assert default["resumed_calls"] == len(docs)
    for d, x in enumerate(docs):
        logits = torch_ape_logits(hf, np.array([1]), x[-W - 512 : -W].reshape(2, 256), x[-W:], 1.0, 1.0)
        assert default["results"]["ape"][1]["nll_per_doc"][d] == pytest.approx(nll_of(logits, x[-W:], W - 1), abs=1e-4)
    # rerun with the first settings: every call from the log, the first results
    again = ev.evaluate_lm(model, docs, ape=settings, **kw)
    assert again["resumed_calls"] == 2 * len(docs)  # truncation and ape at 512, per document
    assert again["results"] == result["results"]
    with pytest.raises(ValueError, match="temperature"):
        ev.APESettings(temperature=0.0)
    with pytest.raises(ValueError, match="prefix"):
        ev.APESettings(prefix=(1, -2))


def test_ape_default_prefix_is_the_bos_that_prompts_begin_with():
    from types import SimpleNamespace

    from cepe.baselines import prompt_start

    class Tok:
        def __init__(self, adds_bos: bool) -> None:
            self.bos_token_id, self.adds = 7, adds_bos

        def encode(self, text, add_special_tokens=True):
            return ([7] if self.adds and add_special_tokens else []) + [50]

    cfg = SimpleNamespace(bos_token_id=7)
    assert prompt_start(SimpleNamespace(config=cfg, tokenizer=Tok(True))) == [7]
    assert prompt_start(SimpleNamespace(config=cfg, tokenizer=Tok(False))) == []  # e.g. SmolLM2's
    assert prompt_start(SimpleNamespace(config=cfg, tokenizer=None)) == [7]
    assert prompt_start(SimpleNamespace(config=SimpleNamespace(bos_token_id=None), tokenizer=None)) == []
    no_bos = SimpleNamespace(config=cfg, tokenizer=Tok(False))
    assert ev.APESettings().as_dict(no_bos) == {"temperature": 1.0, "scale": 1.0, "prefix": []}
    assert ev.APESettings(prefix=(3, 4)).prefix_ids(no_bos).tolist() == [3, 4]
