"""Chapter 10 checkers: the reference passes, typical mistakes are caught (stubs: test_grading_scaffold.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run, stub, assert_caught

from moe_course.grading import ch10
from moe_course.grading.core import ERROR, NOT_IMPLEMENTED, PASS


# ---------------------------------------------------------------- Exercise 10.1: entmax15
def entmax15_sort(z):
    z = (z - z.max(dim=-1, keepdim=True).values) / 2
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean, mean_sq = zs.cumsum(-1) / k, (zs**2).cumsum(-1) / k
    tau = mean - ((1 - k * (mean_sq - mean**2)) / k).clamp(min=0).sqrt()
    support = (tau <= zs).sum(-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)).clamp(min=0) ** 2


def entmax15_bisect(z):
    """Right forward values, but tau found by bisection carries no gradient: the check must catch it."""
    z = (z - z.max(dim=-1, keepdim=True).values) / 2
    lo, hi = torch.full_like(z[..., :1], -1.0), torch.zeros_like(z[..., :1])
    for _ in range(60):
        tau = (lo + hi) / 2
        mass = (z - tau).clamp(min=0).pow(2).sum(-1, keepdim=True)
        lo, hi = torch.where(mass >= 1, tau, lo), torch.where(mass >= 1, hi, tau)
    p = (z - (lo + hi) / 2).clamp(min=0) ** 2
    return p / p.sum(-1, keepdim=True)


def entmax15_package(z):
    from moe_course.factorized import entmax15

    return entmax15(z)


def entmax_not_halved(z):
    return entmax15_sort(2 * z)


def entmax_is_softmax(z):
    return torch.softmax(z, -1)


def entmax_is_sparsemax(z):
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    tau = (zs.cumsum(-1) - 1) / k
    support = (zs > tau).sum(-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)).clamp(min=0)


def entmax_off_by_one(z):
    z = (z - z.max(dim=-1, keepdim=True).values) / 2
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean, mean_sq = zs.cumsum(-1) / k, (zs**2).cumsum(-1) / k
    tau = mean - ((1 - k * (mean_sq - mean**2)) / k).clamp(min=0).sqrt()
    support = (tau <= zs).sum(-1, keepdim=True)
    return (z - tau.gather(-1, (support - 2).clamp(min=0))).clamp(min=0) ** 2


def entmax_no_max_shift(z):
    z = z / 2
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean, mean_sq = zs.cumsum(-1) / k, (zs**2).cumsum(-1) / k
    tau = mean - ((1 - k * (mean_sq - mean**2)) / k).clamp(min=0).sqrt()
    support = (tau <= zs).sum(-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)).clamp(min=0) ** 2


def entmax_detached(z):
    return entmax15_sort(z.detach())


def entmax_wrong_axis(z):
    return entmax15_sort(z.T).T


@pytest.mark.parametrize("fn", [entmax15_sort, entmax15_package])
def test_entmax_correct_answers_pass(fn):
    assert run(ch10.check_entmax15, fn).status == PASS


def test_entmax_stub_is_not_implemented(capsys):
    result = ch10.check_entmax15(stub)
    assert result.status == NOT_IMPLEMENTED
    assert "not implemented" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fn, words",
    [
        (entmax_not_halved, ["z_i / 2"]),
        (entmax_is_softmax, ["softmax"]),
        (entmax_is_sparsemax, ["sparsemax"]),
        (entmax_off_by_one, ["support"]),
        (entmax_no_max_shift, ["maximum"]),
        (entmax_detached, ["gradient"]),
        (entmax15_bisect, ["gradient"]),
        (entmax_wrong_axis, []),
    ],
)
def test_entmax_mistakes_are_caught(fn, words):
    assert_caught(ch10.check_entmax15, fn, *words)


# ---------------------------------------------------------------- Exercise 10.2: cp_mumoe_forward
def cp_forward(z, a, u_exp, u_in, u_out):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    return ((a @ u_exp) * (z_bar @ u_in)) @ u_out.T


def cp_forward_einsum(z, a, u_exp, u_in, u_out):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    return torch.einsum("tn,nr,ti,ir,or->to", a, u_exp, z_bar, u_in, u_out)  # opt_einsum picks a pairwise order


def cp_forward_bias_row(z, a, u_exp, u_in, u_out):
    """The package's form: add the bias row instead of concatenating a column of ones."""
    return ((a @ u_exp) * torch.addmm(u_in[-1], z, u_in[:-1])) @ u_out.T


def cp_no_bias(z, a, u_exp, u_in, u_out):
    return ((a @ u_exp) * (z @ u_in[:-1])) @ u_out.T


def cp_bias_first(z, a, u_exp, u_in, u_out):
    z_bar = torch.cat([torch.ones(len(z), 1), z], dim=1)
    return ((a @ u_exp) * (z_bar @ u_in)) @ u_out.T


def cp_sum(z, a, u_exp, u_in, u_out):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    return ((a @ u_exp) + (z_bar @ u_in)) @ u_out.T


def cp_materialised(z, a, u_exp, u_in, u_out):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    w = torch.einsum("nr,ir,or->nio", u_exp, u_in, u_out)
    return torch.einsum("tn,ti,nio->to", a, z_bar, w)


def cp_out_not_transposed(z, a, u_exp, u_in, u_out):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    return ((a @ u_exp) * (z_bar @ u_in)) @ u_out


@pytest.mark.parametrize("fn", [cp_forward, cp_forward_einsum, cp_forward_bias_row])
def test_cp_forward_correct_answers_pass(fn):
    assert run(ch10.check_cp_mumoe_forward, fn).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [
        (cp_no_bias, ["bias"]),
        (cp_bias_first, ["wrong end"]),
        (cp_sum, ["elementwise product"]),
        (cp_materialised, ["materialise"]),
        (cp_out_not_transposed, []),
    ],
)
def test_cp_forward_mistakes_are_caught(fn, words):
    assert_caught(ch10.check_cp_mumoe_forward, fn, *words)


# ---------------------------------------------------------------- Exercise 10.3: tr_mumoe_forward
def tr_forward(z, a, g1, g2, g3):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    A = torch.einsum("tn,anb->tab", a, g1)
    B = torch.einsum("ti,bic->tbc", z_bar, g2)
    return torch.einsum("tac,coa->to", torch.bmm(A, B), g3)


def tr_forward_matmuls(z, a, g1, g2, g3):
    t, (r1, n, r2), (_, i1, r3) = len(z), g1.shape, g2.shape
    z_bar = torch.cat([z, torch.ones(t, 1)], dim=1)
    A = (a @ g1.permute(1, 0, 2).reshape(n, r1 * r2)).view(t, r1, r2)
    B = (z_bar @ g2.permute(1, 0, 2).reshape(i1, r2 * r3)).view(t, r2, r3)
    return (A @ B).reshape(t, r1 * r3) @ g3.permute(2, 0, 1).reshape(r1 * r3, -1)


def tr_ring_transposed(z, a, g1, g2, g3):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    A = torch.einsum("tn,anb->tab", a, g1)
    B = torch.einsum("ti,bic->tbc", z_bar, g2)
    return torch.einsum("tac,aoc->to", torch.bmm(A, B), g3)


def tr_no_bias(z, a, g1, g2, g3):
    A = torch.einsum("tn,anb->tab", a, g1)
    B = torch.einsum("ti,bic->tbc", z, g2[:, :-1])
    return torch.einsum("tac,coa->to", torch.bmm(A, B), g3)


def tr_materialised(z, a, g1, g2, g3):
    z_bar = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    w = torch.einsum("anb,bic,coa->nio", g1, g2, g3)
    return torch.einsum("tn,ti,nio->to", a, z_bar, w)


@pytest.mark.parametrize("fn", [tr_forward, tr_forward_matmuls])
def test_tr_forward_correct_answers_pass(fn):
    assert run(ch10.check_tr_mumoe_forward, fn).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [(tr_ring_transposed, ["wrong way round"]), (tr_no_bias, ["bias"]), (tr_materialised, ["materialise"])],
)
def test_tr_forward_mistakes_are_caught(fn, words):
    assert_caught(ch10.check_tr_mumoe_forward, fn, *words)


# ---------------------------------------------------------------- Exercise 10.4: cp_rank_for_budget
def rank_for_budget(budget, d_model, d_hidden, num_experts):
    per_rank = (num_experts + d_model + 1 + d_hidden) + (num_experts + d_hidden + 1 + d_model)
    rank = (budget - d_model * num_experts) // per_rank
    if rank < 1:
        raise ValueError(f"budget {budget} cannot hold the gate and rank 1")
    return rank


def rank_by_search(budget, d_model, d_hidden, num_experts):
    from moe_course.factorized import cp_mumoe_params

    r = 0
    while cp_mumoe_params(d_model, d_model, num_experts, r + 1, hidden_features=d_hidden) <= budget:
        r += 1
    if r == 0:
        raise ValueError("budget too small")
    return r


def rank_no_gate(budget, d_model, d_hidden, num_experts):
    return budget // ((num_experts + d_model + 1 + d_hidden) + (num_experts + d_hidden + 1 + d_model))


def rank_ceil(budget, d_model, d_hidden, num_experts):
    per_rank = (num_experts + d_model + 1 + d_hidden) + (num_experts + d_hidden + 1 + d_model)
    rank = math.ceil((budget - d_model * num_experts) / per_rank)
    if rank < 1:
        raise ValueError("budget")
    return rank


def rank_one_layer(budget, d_model, d_hidden, num_experts):
    rank = (budget - d_model * num_experts) // (num_experts + d_model + 1 + d_hidden)
    if rank < 1:
        raise ValueError("budget")
    return rank


def rank_no_bias(budget, d_model, d_hidden, num_experts):
    rank = (budget - d_model * num_experts) // (2 * num_experts + 2 * d_model + 2 * d_hidden)
    if rank < 1:
        raise ValueError("budget")
    return rank


def rank_float(budget, d_model, d_hidden, num_experts):
    return float(rank_for_budget(budget, d_model, d_hidden, num_experts))


def rank_never_raises(budget, d_model, d_hidden, num_experts):
    per_rank = (num_experts + d_model + 1 + d_hidden) + (num_experts + d_hidden + 1 + d_model)
    return max((budget - d_model * num_experts) // per_rank, 0)


@pytest.mark.parametrize("fn", [rank_for_budget, rank_by_search])
def test_rank_correct_answers_pass(fn):
    assert run(ch10.check_cp_rank_for_budget, fn).status == PASS


@pytest.mark.parametrize(
    "fn, words",
    [
        (rank_no_gate, ["gate"]),
        (rank_ceil, ["rounded up"]),
        (rank_one_layer, ["TWO layers"]),
        (rank_no_bias, ["bias"]),
        (rank_float, ["int"]),
        (rank_never_raises, ["ValueError"]),
    ],
)
def test_rank_mistakes_are_caught(fn, words):
    assert_caught(ch10.check_cp_rank_for_budget, fn, *words)


def test_checkers_never_raise_on_crashing_code():
    def crash(*args):
        return torch.zeros(3) @ torch.zeros(4)

    for check in (ch10.check_entmax15, ch10.check_cp_mumoe_forward, ch10.check_tr_mumoe_forward,
                  ch10.check_cp_rank_for_budget):
        assert run(check, crash).status == ERROR
