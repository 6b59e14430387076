"""Shared fixtures: tiny random LLaMA-family models built with transformers
(the independent oracle) and saved to temporary HF model directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cepe.testing import tiny_config

# the plugin's fixtures (tiny_llama, tiny_cepe, default_model, reference) also where cepe is
# not installed with its pytest11 entry point (an in-place build)
pytest_plugins = ["cepe.testing.plugin"]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# smaller than the plugin's tiny_llama: 2 layers, a 1024-token window
BASE = tiny_config(
    vocab_size=97, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=1024, rms_norm_eps=1e-6
)


def build_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A random transformers model with weights large enough that every layer
    matters (the default init of 0.02 makes tiny models nearly linear)."""
    cfg_cls = transformers.MistralConfig if model_type == "mistral" else transformers.LlamaConfig
    model_cls = transformers.MistralForCausalLM if model_type == "mistral" else transformers.LlamaForCausalLM
    kw = {**BASE, **overrides}
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw)
    cfg.initializer_range = 0.15
    model = model_cls(cfg).eval()
    with torch.no_grad():  # norms away from 1 so their weights are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def save_model(model, path: str, dtype=None, max_shard_size=None) -> str:
    kw = {}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(name, model_type=..., dtype=..., shard=..., **config) -> (dir, hf fp32 model)."""
    cache: dict = {}

    def make(name: str, model_type: str = "llama", dtype=None, max_shard_size=None, **overrides):
        if name in cache:
            return cache[name]
        hf = build_hf_model(model_type, **overrides)
        path = str(tmp_path_factory.mktemp(name))
        save_model(hf, path, dtype=dtype, max_shard_size=max_shard_size)
        if dtype is not None:  # the oracle reads the same rounded weights, in fp32
            hf = type(hf).from_pretrained(path, dtype=torch.float32).eval()
        cache[name] = (path, hf)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def tiny(model_factory):
    return model_factory("tiny")


def hf_logits(hf, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.as_tensor(attention_mask)
        if position_ids is not None:
            kw["position_ids"] = torch.as_tensor(position_ids)
        return hf(torch.as_tensor(np.atleast_2d(ids)), **kw).logits.float().numpy()


def hf_greedy(hf, prompt: np.ndarray, n: int) -> np.ndarray:
    """transformers' greedy continuation of prompt (B, T): exactly n new tokens each, no eos stop."""
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, prompt.shape[1] :].numpy()


def overcommit_always() -> bool:
    """Whether the kernel grants any allocation (vm.overcommit_memory = 1): then a too-large
    request does not fail, and the tests of its error skip."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def edit_json(path: str, fn) -> None:
    """Rewrites the JSON file at path with fn applied to its content (in place)."""
    with open(path) as fh:
        content = json.load(fh)
    fn(content)
    with open(path, "w") as fh:
        json.dump(content, fh)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m cepe ARGS` in a child process, with no model cache to fall back on."""
    env = {**os.environ, "CEPE_CACHE": "/nonexistent-cepe-cache"}
    return subprocess.run([sys.executable, "-m", "cepe", *args], capture_output=True, text=True, env=env, timeout=300)


def run_config(model, tokens, out, **kw) -> dict:
    """A small training run's config (`cepe train`, `cepe teacher`): warm-up, 5 steps of 4 windows
    of 24 tokens after 4 encoder chunks, one thread, a checkpoint only at the end; kw overrides."""
    cfg = dict(
        model=model,
        output_dir=str(out),
        stage="warmup",
        tokens=tokens,
        decoder_len=24,
        n_ctx=4,
        batch_size=4,
        total_steps=5,
        lr=5e-3,
        save_every=0,
        threads=1,
        seed=3,
    )
    cfg.update(kw)
    return cfg


def write_config(path, cfg: dict) -> str:
    """JSON, or TOML for a .toml path (flat keys; tables written inline)."""
    path = str(path)
    if path.endswith(".toml"):

        def val(v):
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):
                return json.dumps(v)
            if isinstance(v, list):
                return "[" + ", ".join(val(x) for x in v) + "]"
            if isinstance(v, dict):
                return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
            return repr(v)

        text = "".join(f"{k} = {val(v)}\n" for k, v in cfg.items())
        with open(path, "w") as f:
            f.write(text)
    else:
        with open(path, "w") as f:
            json.dump(cfg, f)
    return path


def random_ids(rng: np.random.Generator, shape, vocab: int = BASE["vocab_size"]) -> np.ndarray:
    return rng.integers(3, vocab, size=shape, dtype=np.int64)


TEXT = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
    "all that glitters is not gold. the early bird catches the worm. "
    "where there is smoke there is fire. actions speak louder than words. "
) * 3


def write_tokenizer(path, vocab_size: int) -> None:
    """A small BPE tokenizer.json (+ config) trained on TEXT, BOS added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def write_chat_tokenizer(path, vocab_size: int) -> None:
    """write_tokenizer's files plus a small chat template (ChatML-like, with <s> and </s>)."""
    write_tokenizer(path, vocab_size)
    conf = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": CHAT_TEMPLATE}))


# Model directories with a tokenizer, shared by the text, chat, server and CLI tests: built once a
# session, read only (a test that edits one copies it first).


def _with_tokenizer(tmp_path_factory, name: str, tiny_dir: str | None, chat: bool) -> str:
    """A copy of tiny_dir (None: the CEPE reference model, seed 5) with a tokenizer written in."""
    from cepe.testing.reference import make_reference

    p = tmp_path_factory.mktemp(name)
    if tiny_dir is None:
        make_reference(seed=5).save(str(p))
    else:
        shutil.copytree(tiny_dir, p, dirs_exist_ok=True)
    (write_chat_tokenizer if chat else write_tokenizer)(p, 101 if tiny_dir is None else 97)
    return str(p)


@pytest.fixture(scope="session")
def text_dir(tiny, tmp_path_factory) -> str:
    return _with_tokenizer(tmp_path_factory, "tiny_text", tiny[0], chat=False)


@pytest.fixture(scope="session")
def chat_dir(tiny, tmp_path_factory) -> str:
    return _with_tokenizer(tmp_path_factory, "tiny_chat", tiny[0], chat=True)


@pytest.fixture(scope="session")
def cepe_text_dir(tmp_path_factory) -> str:
    return _with_tokenizer(tmp_path_factory, "cepe_text", None, chat=False)


@pytest.fixture(scope="session")
def cepe_chat_dir(tmp_path_factory) -> str:
    return _with_tokenizer(tmp_path_factory, "cepe_chat", None, chat=True)


@pytest.fixture(scope="module")
def text_model(text_dir):
    import cepe

    return cepe.load(text_dir)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
