"""One field table for the sampling settings and the OpenAI request fields: the keyword arguments
of cepe.Sampler, Model.create_completion and Model.create_chat_completion come from it, and a
misspelt one is refused naming the close ones."""

from __future__ import annotations

import dataclasses

import pytest

import cepe
from cepe.completions import SAMPLING_FIELDS, ChatCompletionFields, CompletionFields, RequestFields
from cepe.sampling import SamplingOptions, SamplingSettings


def test_tables_agree():
    assert set(SamplingOptions.__annotations__) == {f.name for f in dataclasses.fields(SamplingSettings)}
    assert set(SAMPLING_FIELDS) <= set(RequestFields.__annotations__)
    assert set(ChatCompletionFields.__annotations__) - set(RequestFields.__annotations__) == {
        "logprobs",
        "top_logprobs",
    }
    assert set(CompletionFields.__annotations__) - set(RequestFields.__annotations__) == {"echo", "logprobs"}


def test_misspelt_keywords_are_refused_with_the_close_names(tiny):
    with pytest.raises(TypeError, match=r"Sampler\(\) got an unexpected keyword argument 'temprature'; did you mean "):
        cepe.Sampler(10, temprature=0.5)  # type: ignore[call-arg]
    model = cepe.load(tiny[0])
    with pytest.raises(TypeError, match=r"'max_token'; did you mean 'max_tokens'\?"):
        model.create_completion([1, 2, 3], max_token=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"create_chat_completion\(\) got an unexpected keyword argument 'echo'"):
        model.create_chat_completion([{"role": "user", "content": "hi"}], echo=True)  # type: ignore[call-arg]


def test_sampler_keywords_reach_the_chain():
    s = cepe.Sampler(10, top_k=3, temperature=0.7, seed=4)
    assert s.settings == SamplingSettings(top_k=3, temperature=0.7)
