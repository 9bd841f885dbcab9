"""Judging a compressed model beyond perplexity (chapter 11): the routing flip rate after
quantization and the generation judge (the reference's perplexity on sampled text, repetition)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from moe_course import metrics
from moe_course.compress.quantization import quantize
from moe_course.compress.trimming import drop_experts, drop_layers
from moe_course.zoo import data, pretrained


@pytest.fixture(scope="module")
def lm(single_thread):
    model = pretrained("shakespeare-moe", progress=False).eval()
    val = data("shakespeare-moe")["validation"]
    return model, val.select(range(8)), torch.as_tensor(val[:4]["input_ids"])[:, :16]


# ------------------------------------------------------------------------------- flip rate
def test_flip_rate_zero_for_a_copy(lm):
    model, val, _ = lm
    r = metrics.routing_flip_rate(model, copy.deepcopy(model), val)
    assert r.overall == 0.0 and r.per_layer == [0.0] * len(r.per_layer)
    assert len(r.per_layer) == 4 and r.num_tokens == 8 * 64 and float(r) == 0.0


def test_flip_rate_positive_for_2bit_and_bounded(lm):
    model, val, _ = lm
    q2 = quantize(model, 2, group_size=32)
    r = metrics.routing_flip_rate(model, q2, val)
    assert 0.0 < r.overall <= 1.0 and all(0.0 <= v <= 1.0 for v in r.per_layer)
    assert r.overall == pytest.approx(sum(r.per_layer) / len(r.per_layer))
    # a finer quantization flips fewer tokens than the coarse 2-bit one
    assert metrics.routing_flip_rate(model, quantize(model, 8, group_size=32), val).overall < r.overall
    # each model routes its own hidden states: the input model is untouched, calls are repeatable
    assert metrics.routing_flip_rate(model, q2, val).per_layer == r.per_layer


def test_flip_rate_refuses_different_experts_or_layers(lm):
    model, val, _ = lm
    calib = data("shakespeare-moe")["train"].select(range(8))
    with pytest.raises(ValueError, match=r"other: MoE layer 0 has 6 experts, reference has 8"):
        metrics.routing_flip_rate(model, drop_experts(model, 6, calib=calib), val)
    with pytest.raises(ValueError, match=r"other: has 3 MoE layers, reference has 4"):
        metrics.routing_flip_rate(model, drop_layers(model, keep=3, calib=calib), val)
    with pytest.raises(TypeError, match="other"):
        metrics.routing_flip_rate(model, "q", val)
    with pytest.raises(ValueError, match="reference"):
        metrics.routing_flip_rate(nn.Linear(2, 2), model, val)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.routing_flip_rate(model, model, val, batch_size=0)


# ------------------------------------------------------------------------------- generation judge
def test_generation_quality_deterministic_under_a_seed(lm):
    model, _, prompts = lm
    a = metrics.generation_quality(model, prompts, reference=model, new_tokens=24, seed=3)
    b = metrics.generation_quality(model, prompts, reference=model, new_tokens=24, seed=3)
    assert torch.equal(a.tokens, b.tokens) and a.perplexity == b.perplexity and a.texts == b.texts
    assert a.tokens.shape == (4, 16 + 24) and torch.equal(a.tokens[:, :16], prompts)
    assert len(a.texts) == 4 and all(len(t) == 24 for t in a.texts)
    assert 1.0 < a.perplexity < model.config.vocab_size and 0.0 <= a.repetition <= 1.0
    c = metrics.generation_quality(model, prompts, reference=model, new_tokens=24, seed=4)
    assert not torch.equal(a.tokens, c.tokens)
    # strings as prompts, encoded with the model's tokenizer
    s = metrics.generation_quality(model, ["ROMEO:\n", "JULIET"[:6] + " "], new_tokens=8)
    assert s.tokens.shape == (2, 15)


def test_repetition_rate():
    assert metrics.repetition_rate([7] * 40) == pytest.approx(1 - 1 / 37)
    assert metrics.repetition_rate(torch.arange(40)) == 0.0
    assert metrics.repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(1 - 2 / 5)
    with pytest.raises(ValueError, match="n"):
        metrics.repetition_rate([1, 2, 3], n=0)


class _RandomLM(nn.Module):
    """Generates uniformly random tokens (the judge's worst case)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.w = vocab, nn.Parameter(torch.zeros(1))

    def generate(self, ids, max_new_tokens, temperature=1.0, generator=None):
        new = torch.randint(0, self.vocab, (ids.shape[0], max_new_tokens), generator=generator)
        return torch.cat([ids, new], dim=1)


def test_reference_prefers_its_greedy_text_to_random_tokens(lm):
    model, _, prompts = lm
    greedy = metrics.generation_quality(model, prompts, reference=model, new_tokens=32, temperature=0)
    rand = metrics.generation_quality(_RandomLM(model.config.vocab_size), prompts, reference=model,
                                      new_tokens=32)
    assert greedy.perplexity < rand.perplexity
    assert greedy.repetition > rand.repetition  # greedy decoding of a small model loops


@pytest.mark.parametrize("kwargs, exc, words", [
    ({"model": nn.Linear(2, 2)}, TypeError, "model"),
    ({"reference": "fp32"}, TypeError, "reference"),
    ({"new_tokens": 0}, ValueError, "new_tokens"),
    ({"new_tokens": 60}, ValueError, "new_tokens"),
    ({"prompts": "ROMEO"}, TypeError, "prompts"),
    ({"prompts": [[1, 2], [3]]}, ValueError, "prompts"),
    ({"prompts": [[1, 999]]}, ValueError, "prompts"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"ngram": 0}, ValueError, "ngram"),
])
def test_generation_quality_bad_input_names_the_argument(lm, kwargs, exc, words):
    model, _, prompts = lm
    args = {"model": model, "prompts": prompts, "reference": None, "new_tokens": 8, **kwargs}
    with pytest.raises(exc, match=words):
        metrics.generation_quality(**args)
