"""How each method of the QA protocol (cepe.eval_qa) answers a question from its
retrieved passages, all greedily (at most max_new_tokens, stopping at a newline
or EOS), on one model's weights:

  cepe        the top k_decoder passages in the prompt, the next k_encoder through the
              encoder, one chunk each, and the demonstrations in one more encoder chunk
              (the paper's protocol; cepe.rag.answer)
  truncation  the decoder alone with the top k_decoder passages in the prompt
  full        all k_decoder + k_encoder passages in the prompt
  replug      REPLUG: each of the k_decoder + k_encoder passages in a prompt of its own,
              the next-token distributions mixed with weights softmax(retrieval scores)
              at every step (cepe.baselines.replug_log_weights)
  pcw         parallel context windows: each passage's document block a window of its
              own (tokenized as a prompt: with BOS where prompts begin with one;
              positions from 0), the demonstrations, question and answer after the
              longest window, attending to every window
  ape         APE: the windows after a shared prefix (default: BOS where prompts begin
              with one), the task tokens' attention to them with APE's temperature and
              scale

The prompt is cepe.rag.build_prompt's: document blocks, demonstrations, question,
joined by blank lines; replug, pcw and ape split that same text at the passages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .baselines import APESettings, OpsDecoder, log_softmax, replug_log_weights, replug_mix

QA_METHODS = ("cepe", "truncation", "full", "replug", "pcw", "ape")

__all__ = ["QA_METHODS", "QAAnswerer"]


def greedy_text(model: Any, logits: np.ndarray, step: Callable[[int], np.ndarray], max_new_tokens: int) -> str:
    """Greedy decoding from the first next-token logits, step(token) giving the next ones: the
    answer text up to the first newline, EOS or max_new_tokens tokens, stripped (as
    generate_text with stop=["\\n"] returns it)."""
    tok, eos = model.tokenizer, set(model.config.eos_token_id)
    out: list[int] = []
    while len(out) < max_new_tokens:
        t = int(np.argmax(logits))
        if t in eos:
            break
        out.append(t)
        text = tok.decode(out)
        if "\n" in text:
            return text[: text.index("\n")].strip()
        if len(out) < max_new_tokens:
            logits = step(t)
    return str(tok.decode(out)).strip()


class QAAnswerer:
    """Answers questions by one method, with the protocol's settings."""

    def __init__(
        self,
        model: Any,
        method: str,
        *,
        k_decoder: int,
        k_encoder: int,
        demos: Sequence[tuple[str, str]],
        max_new_tokens: int,
        ape: APESettings | None = None,
    ) -> None:
        if method not in QA_METHODS:
            raise ValueError(f"unknown QA method {method!r}; choose from {', '.join(QA_METHODS)}")
        if method not in ("cepe", "truncation", "full") and k_decoder + k_encoder == 0:
            raise ValueError(f"method {method!r} needs passages: k_decoder + k_encoder must be >= 1")
        if model.tokenizer is None:
            raise ValueError("the QA protocol needs the model's tokenizer, and the model has none")
        self.model, self.method = model, method
        self.k_decoder, self.k_encoder = k_decoder, k_encoder
        self.demos, self.max_new_tokens = list(demos), max_new_tokens
        self.ape = APESettings() if ape is None else ape
        self._ops: OpsDecoder | None = None

    def __call__(self, question: str, passages: Sequence[Any]) -> str:
        """The answer to question given its ranked passages (cepe.retrieval.Passage, at least
        k_decoder + k_encoder of them where there are that many)."""
        from .rag import answer

        m, kd, ke = self.method, self.k_decoder, self.k_encoder
        if m in ("cepe", "truncation", "full"):
            in_dec, in_enc = {"cepe": (kd, ke), "truncation": (kd, 0), "full": (kd + ke, 0)}[m]
            found = list(passages)
            out = answer(
                question, lambda _q, _k: found, k=max(1, len(found)), in_decoder=in_dec, in_encoder=in_enc,
                model=self.model, demos=self.demos, max_new_tokens=self.max_new_tokens,
            )  # fmt: skip
            return out.text
        use = list(passages[: kd + ke])
        if not use:
            raise ValueError(f"method {m!r}: the question {question!r} has no passages")
        if m == "replug":
            return self._replug(question, use)
        return self._windows(question, use)

    def _replug(self, question: str, passages: list[Any]) -> str:
        from .rag import build_prompt
        from .text import prompt_ids

        model = self.model
        logw = replug_log_weights(len(passages), [float(p.score) for p in passages])
        caches, first = [], []
        for p in passages:
            ids = prompt_ids(model, build_prompt(question, [p], self.demos), chat=False)
            cache = model.create_cache(1, len(ids) + self.max_new_tokens)
            first.append(model.forward(np.asarray(ids)[None], cache=cache, logits="last")[0])
            caches.append(cache)

        def mix(z: Sequence[np.ndarray]) -> np.ndarray:
            return replug_mix(log_softmax(np.stack(z)), logw)

        def step(t: int) -> np.ndarray:
            return mix([model.forward(np.asarray([[t]]), cache=c, logits="last")[0] for c in caches])

        return greedy_text(model, mix(first), step, self.max_new_tokens)

    def _windows(self, question: str, passages: list[Any]) -> str:
        from .rag import build_prompt, document_block

        model, tok = self.model, self.model.tokenizer
        if self._ops is None:
            self._ops = OpsDecoder.from_model(model, n_threads=getattr(model, "n_threads", 1))
        blocks = [document_block(p) + "\n\n" for p in passages]
        if self.method == "pcw":  # each window tokenized as a prompt of its own
            windows = self._ops.pcw_windows([tok.encode(b) for b in blocks])
        else:
            a = self.ape
            windows = self._ops.pcw_windows(
                [tok.encode(b, add_special_tokens=False) for b in blocks],
                prefix=a.prefix_ids(model), temperature=a.temperature, scale=a.scale,
            )  # fmt: skip
        ids = tok.encode(build_prompt(question, [], self.demos), add_special_tokens=False)
        ops = self._ops
        past: list[Any] = []  # the task tokens' keys and values, kept between steps

        def step(t: int) -> np.ndarray:
            return ops.pcw_logits(windows, [t], last=True, past=past)

        return greedy_text(model, ops.pcw_logits(windows, ids, last=True, past=past), step, self.max_new_tokens)
