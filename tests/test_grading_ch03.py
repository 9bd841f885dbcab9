"""Chapter 3 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run

from moe_course.grading import ch03
from moe_course.grading.core import ERROR, FAIL, PASS


# ---------------------------------------------------------------- Exercise 3.1: active_params_per_token
def active_params_per_token(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    matrices = 3 if activation == "swiglu" else 2
    return d_model * num_experts + (k + num_shared) * matrices * d_model * d_hidden


def active_params_from_layer(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """Asking the package's layer is a correct answer too (and returns a tensor-free int)."""
    from moe_course.layers import SparseMoE

    layer = SparseMoE(d_model, num_experts, d_hidden, k=k, num_shared_experts=num_shared, activation=activation)
    return torch.tensor(layer.active_params_per_token())


def all_experts(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    return active_params_per_token(d_model, d_hidden, num_experts, num_experts, activation, num_shared)


def no_router(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    return active_params_per_token(d_model, d_hidden, num_experts, k, activation, num_shared) - d_model * num_experts


def swiglu_two_matrices(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    return d_model * num_experts + (k + num_shared) * 2 * d_model * d_hidden


def forgot_shared(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    return active_params_per_token(d_model, d_hidden, num_experts, k, activation, 0)


def flops_not_params(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    return 2 * active_params_per_token(d_model, d_hidden, num_experts, k, activation, num_shared)


def router_times_k(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    matrices = 3 if activation == "swiglu" else 2
    return d_model * k + (k + num_shared) * matrices * d_model * d_hidden


@pytest.mark.parametrize("fn", [active_params_per_token, active_params_from_layer])
def test_active_params_correct_answers_pass(fn):
    assert run(ch03.check_active_params_per_token, fn).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [
        (all_experts, "ALL num_experts"),
        (no_router, "router is missing"),
        (swiglu_two_matrices, "THREE matrices"),
        (forgot_shared, "shared experts are missing"),
        (flops_not_params, "FLOPs"),
        (router_times_k, "not d_model * k"),
    ],
)
def test_active_params_mistakes_are_caught_with_a_specific_hint(fn, words):
    result = run(ch03.check_active_params_per_token, fn)
    assert result.status in (FAIL, ERROR)
    assert words in result.message


def test_active_params_non_integer_fails():
    result = run(ch03.check_active_params_per_token, lambda *a: active_params_per_token(*a) + 0.5)
    assert result.status == FAIL and "whole number" in result.message


# ---------------------------------------------------------------- Exercise 3.2: expert_frequency
def expert_frequency(indices, num_experts):
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts)
    return counts.float() / indices.numel()


def expert_frequency_one_hot(indices, num_experts):
    """Another correct route: one-hot, sum, normalise."""
    hits = F.one_hot(indices, num_experts).sum(dim=(0, 1)).double()
    return hits / hits.sum()


def divide_by_tokens(indices, num_experts):
    return torch.bincount(indices.reshape(-1), minlength=num_experts).float() / indices.shape[0]


def no_minlength(indices, num_experts):
    return torch.bincount(indices.reshape(-1)).float() / indices.numel()


def raw_counts(indices, num_experts):
    return torch.bincount(indices.reshape(-1), minlength=num_experts).float()


def integer_division(indices, num_experts):
    return torch.bincount(indices.reshape(-1), minlength=num_experts) // indices.numel()


def first_choice_only(indices, num_experts):
    return torch.bincount(indices[:, 0], minlength=num_experts).float() / indices.shape[0]


def per_slot(indices, num_experts):
    return F.one_hot(indices, num_experts).float().mean(dim=0)


@pytest.mark.parametrize("fn", [expert_frequency, expert_frequency_one_hot])
def test_expert_frequency_correct_answers_pass(fn):
    assert run(ch03.check_expert_frequency, fn).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [
        (divide_by_tokens, "T*k"),
        (no_minlength, "minlength"),
        (raw_counts, "raw counts"),
        (integer_division, "floating-point"),
        (first_choice_only, "FIRST choice"),
        (per_slot, "per routing slot"),
    ],
)
def test_expert_frequency_mistakes_are_caught_with_a_specific_hint(fn, words):
    result = run(ch03.check_expert_frequency, fn)
    assert result.status in (FAIL, ERROR)
    assert words in result.message


# ---------------------------------------------------------------- Exercise 3.3: perplexity
def perplexity(logits, input_ids):
    v = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1))
    return torch.exp(loss)


def perplexity_by_hand(logits, input_ids):
    """log_softmax + gather, returned as a Python float: correct too."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:].unsqueeze(-1))
    return math.exp(nll.mean().item())


def no_shift(logits, input_ids):
    v = logits.shape[-1]
    return torch.exp(F.cross_entropy(logits.reshape(-1, v), input_ids.reshape(-1)))


def exp_of_sum(logits, input_ids):
    v = logits.shape[-1]
    return torch.exp(F.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1), reduction="sum"))


def power_of_two(logits, input_ids):
    v = logits.shape[-1]
    return 2 ** F.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1))


def mean_of_sequence_perplexities(logits, input_ids):
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return nll.mean(dim=1).exp().mean()


def returns_the_loss(logits, input_ids):
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1))


def not_flattened(logits, input_ids):
    return torch.exp(F.cross_entropy(logits[:, :-1], input_ids[:, 1:]))


def unstable_softmax(logits, input_ids):
    e = logits[:, :-1].exp()
    p = e / e.sum(-1, keepdim=True)
    return torch.exp(-p.gather(-1, input_ids[:, 1:].unsqueeze(-1)).log().mean())


@pytest.mark.parametrize("fn", [perplexity, perplexity_by_hand])
def test_perplexity_correct_answers_pass(fn):
    assert run(ch03.check_perplexity, fn).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [
        (no_shift, "NEXT token"),
        (exp_of_sum, "SUMMED"),
        (power_of_two, "log bases"),
        (mean_of_sequence_perplexities, "per-sequence"),
        (returns_the_loss, "exponential"),
        (not_flattened, "dim 1"),
        (unstable_softmax, "log_softmax"),
    ],
)
def test_perplexity_mistakes_are_caught_with_a_specific_hint(fn, words):
    result = run(ch03.check_perplexity, fn)
    assert result.status in (FAIL, ERROR)
    assert words in result.message


def test_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(ch03.check_active_params_per_token, active_params_per_token)
    run(ch03.check_expert_frequency, expert_frequency)
    run(ch03.check_perplexity, perplexity)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- Exercise 3.4: load_cv on digits-moe
def load_cv(indices, num_experts):
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    return float(counts.std(unbiased=False) / counts.mean())


def load_cv_sample_std(indices, num_experts):
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    return float(counts.std() / counts.mean())


def load_cv_idle_experts_dropped(indices, num_experts):
    counts = torch.bincount(indices.reshape(-1)).double()
    counts = counts[counts > 0]
    return float(counts.std(unbiased=False) / counts.mean())


@pytest.fixture()
def digits_test_routing(monkeypatch, tmp_path):
    """The check's real-model part on the digits-moe *test* preset (seconds, not the cpu model)."""
    from moe_course import metrics, zoo

    model = zoo.pretrained("digits-moe", preset="test", cache_dir=tmp_path, progress=False)
    split = zoo.data("digits-moe", "test")["validation"]
    stats = metrics.routing_stats(model, split, batch_size=512, max_tokens=len(split) * 16, device="cpu")
    monkeypatch.setattr(ch03, "_DIGITS", {"indices": [s.indices for s in stats],
                                          "load_cv": [s.load_cv for s in stats],
                                          "num_experts": stats[0].num_experts})
    return stats


def test_load_cv_reference_passes_and_matches_the_package(digits_test_routing, capsys):
    assert run(ch03.check_load_cv, load_cv).status == PASS
    cv = digits_test_routing[0].load_cv
    assert load_cv(digits_test_routing[0].indices, 4) == pytest.approx(cv, rel=1e-6)


@pytest.mark.parametrize("fn, words", [(load_cv_sample_std, "sample standard deviation"),
                                       (load_cv_idle_experts_dropped, "minlength")])
def test_load_cv_mistakes_are_caught_with_a_specific_hint(digits_test_routing, fn, words):
    result = run(ch03.check_load_cv, fn)
    assert result.status == FAIL and words in result.message
