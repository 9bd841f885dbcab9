"""Chapter 2 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run, stub

from moe_course.grading import ch02
from moe_course.grading.core import ERROR, FAIL, NOT_IMPLEMENTED, PASS


# ---------------------------------------------------------------- Exercise 2.1: topk_route
def topk_route(logits, k):
    probs = torch.softmax(logits, dim=-1)
    weights, indices = probs.topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


def topk_route_kept_logits(logits, k):
    """Shazeer's form, softmax over the kept logits: the same function, must pass too."""
    top, indices = logits.topk(k, dim=-1)
    return torch.softmax(top, dim=-1), indices


def topk_route_reversed_order(logits, k):
    w, i = topk_route(logits, k)
    return w.flip(-1), i.flip(-1)


def not_renormalised(logits, k):
    return torch.softmax(logits, dim=-1).topk(k, dim=-1)


def softmax_wrong_axis(logits, k):
    weights, indices = torch.softmax(logits, dim=0).topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


def weights_from_wrong_softmax(logits, k):
    top, indices = logits.topk(k, dim=-1)
    return torch.softmax(top, dim=0), indices


def weights_first_columns(logits, k):
    _, indices = logits.topk(k, dim=-1)
    w = torch.softmax(logits, dim=-1)[:, :k]
    return w / w.sum(-1, keepdim=True), indices


def detached_weights(logits, k):
    w, i = topk_route(logits.detach(), k)
    return w, i


def unstable_exp(logits, k):
    e = logits.exp()
    w, i = (e / e.sum(-1, keepdim=True)).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


@pytest.mark.parametrize("fn", [topk_route, topk_route_kept_logits, topk_route_reversed_order])
def test_topk_route_correct_answers_pass(fn):
    assert run(ch02.check_topk_route, fn).status == PASS


def test_topk_route_stub_is_not_implemented(capsys):
    result = ch02.check_topk_route(stub)
    assert result.status == NOT_IMPLEMENTED
    assert "not implemented" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fn, words",
    [
        (not_renormalised, "not renormalised"),
        (softmax_wrong_axis, "wrong axis"),
        (weights_from_wrong_softmax, "wrong axis"),
        (weights_first_columns, "renormalised probabilities"),
        (detached_weights, "gradient"),
        (unstable_exp, "inf/nan"),
    ],
)
def test_topk_route_mistakes_are_caught_with_a_specific_hint(fn, words):
    result = run(ch02.check_topk_route, fn)
    assert result.status in (FAIL, ERROR)
    assert words in result.message


def test_topk_route_crash_is_an_error_not_an_exception():
    result = run(ch02.check_topk_route, lambda logits, k: logits.topk(k, dim=5))
    assert result.status == ERROR


# ---------------------------------------------------------------- Exercise 2.2: switch_balance_loss
def switch_balance_loss(probs, indices, num_experts):
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (f * probs.mean(dim=0)).sum()


def f_from_soft_probs(probs, indices, num_experts):
    p = probs.mean(dim=0)
    return num_experts * (p * p).sum()


def forgot_n(probs, indices, num_experts):
    return switch_balance_loss(probs, indices, num_experts) / num_experts


def p_from_renormalised_topk(probs, indices, num_experts):
    w = probs.gather(1, indices)
    w = w / w.sum(-1, keepdim=True)
    full = torch.zeros_like(probs).scatter(1, indices, w)
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (f * full.mean(0)).sum()


def f_over_tokens(probs, indices, num_experts):
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.shape[0]
    return num_experts * (f * probs.mean(dim=0)).sum()


def detached_p(probs, indices, num_experts):
    return switch_balance_loss(probs.detach(), indices, num_experts)


def test_switch_balance_loss_reference_passes():
    assert run(ch02.check_switch_balance_loss, switch_balance_loss).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [
        (f_from_soft_probs, "COUNT"),
        (forgot_n, "N factor"),
        (p_from_renormalised_topk, "FULL softmax"),
        (f_over_tokens, "T*k"),
        (detached_p, "no gradient"),
    ],
)
def test_switch_balance_loss_mistakes_are_caught_with_a_specific_hint(fn, words):
    result = run(ch02.check_switch_balance_loss, fn)
    assert result.status in (FAIL, ERROR)
    assert words in result.message


def test_switch_balance_loss_vector_output_fails():
    def per_expert(probs, indices, num_experts):
        f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
        return num_experts * f * probs.mean(0)

    result = run(ch02.check_switch_balance_loss, per_expert)
    assert result.status == FAIL and "scalar" in result.message


# ---------------------------------------------------------------- Exercise 2.3: capacity_keep_mask
def capacity_keep_mask(indices, num_experts, capacity):
    t, k = indices.shape
    queue = indices.t().reshape(-1)  # choice-major
    position = (F.one_hot(queue, num_experts).cumsum(0) - 1).gather(1, queue[:, None]).squeeze(1)
    return (position < capacity).view(k, t).t()


def capacity_keep_mask_loop(indices, num_experts, capacity):
    """A plain Python version of the same rule: must pass too."""
    t, k = indices.shape
    used = [0] * num_experts
    keep = torch.zeros(t, k, dtype=torch.bool)
    for j in range(k):
        for tok in range(t):
            e = int(indices[tok, j])
            if used[e] < capacity:
                keep[tok, j] = True
            used[e] += 1
    return keep


def off_by_one(indices, num_experts, capacity):
    t, k = indices.shape
    queue = indices.t().reshape(-1)
    position = (F.one_hot(queue, num_experts).cumsum(0) - 1).gather(1, queue[:, None]).squeeze(1)
    return (position <= capacity).view(k, t).t()


def token_major(indices, num_experts, capacity):
    queue = indices.reshape(-1)
    position = (F.one_hot(queue, num_experts).cumsum(0) - 1).gather(1, queue[:, None]).squeeze(1)
    return (position < capacity).view(indices.shape)


def float_mask(indices, num_experts, capacity):
    return capacity_keep_mask(indices, num_experts, capacity).float()


def test_capacity_keep_mask_correct_answers_pass():
    assert run(ch02.check_capacity_keep_mask, capacity_keep_mask).status == PASS
    assert run(ch02.check_capacity_keep_mask, capacity_keep_mask_loop).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [(off_by_one, "off by one"), (token_major, "choice-major"), (float_mask, "bool")],
)
def test_capacity_keep_mask_mistakes_are_caught_with_a_specific_hint(fn, words):
    result = run(ch02.check_capacity_keep_mask, fn)
    assert result.status in (FAIL, ERROR)
    assert words in result.message


def test_checkers_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(ch02.check_topk_route, topk_route)
    run(ch02.check_switch_balance_loss, switch_balance_loss)
    run(ch02.check_capacity_keep_mask, capacity_keep_mask)
    assert torch.equal(torch.rand(3), expected)
