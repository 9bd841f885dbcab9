"""Chapter 10 checkers: the references pass, typical mistakes are caught with their own hint, and
the use-it and whole-method exercises run on the shakespeare-moe zoo model and are graded both
ways (stubs: test_grading_scaffold.py; more mutants: tests/mutants/ch10.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_caught, run

from moe_course.calib import layer_inputs
from moe_course.factorized import MuMoEBlock, cp_mumoe_params
from moe_course.grading import ch10
from moe_course.grading.core import FAIL, PASS
from moe_course.layers import moe_layers


# ---------------------------------------------------------------- 10.1 entmax15_backward
def entmax15_backward(p, g):
    s = p.sqrt()
    return s * g - s * (s * g).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)


def test_backward_reference_passes():
    assert run(ch10.check_entmax15_backward, entmax15_backward).status == PASS


@pytest.mark.parametrize("wrong, word", [
    (lambda p, g: p * g - p * (p * g).sum(-1, keepdim=True), "sqrt"),
    (lambda p, g: p.sqrt() * g, "projection"),
    (lambda p, g: p * (g - (p * g).sum(-1, keepdim=True)), "softmax"),
    (lambda p, g: -entmax15_backward(p, g), "sign"),
])
def test_backward_mistakes_caught(wrong, word):
    assert_caught(ch10.check_entmax15_backward, wrong, word)


# ---------------------------------------------------------------- 10.2 cp_hier_forward
def cp_hier_forward(x, a1, a2, U1, U2, U_in, U_out):
    x_bar = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return ((a1 @ U1) * (a2 @ U2) * (x_bar @ U_in)) @ U_out.T


def test_hier_reference_passes():
    assert run(ch10.check_cp_hier_forward, cp_hier_forward).status == PASS


def test_hier_mistakes_caught():
    assert_caught(ch10.check_cp_hier_forward,
                  lambda x, a1, a2, U1, U2, U_in, U_out: ((a1 @ U1) * (a2 @ U2) * (x @ U_in[:-1])) @ U_out.T,
                  "[x; 1]")
    assert_caught(ch10.check_cp_hier_forward,
                  lambda x, a1, a2, U1, U2, U_in, U_out: cp_hier_forward(x, a1, a2, U1, U2, U_in, U_out)[:, :1],
                  "shape")


# ---------------------------------------------------------------- 10.3 als_sweep (use it)
def als_sweep(X, factors):
    letters = "abcdefgh"[: X.dim()]
    factors = [f.clone() for f in factors]
    for m in range(X.dim()):
        others = [k for k in range(X.dim()) if k != m]
        spec = ",".join([letters] + [letters[k] + "r" for k in others]) + f"->{letters[m]}r"
        rhs = torch.einsum(spec, X, *[factors[k] for k in others])
        gram = torch.ones(rhs.shape[1], rhs.shape[1], dtype=X.dtype)
        for k in others:
            gram = gram * (factors[k].T @ factors[k])
        factors[m] = rhs @ torch.linalg.pinv(gram)
    return factors


def test_als_reference_passes_and_prints_the_real_error(capsys):
    r = ch10.check_als_sweep(als_sweep)  # not quiet: it prints the real error
    assert r.status == PASS, r.message
    assert "relative error" in capsys.readouterr().out


def test_als_matches_the_package_on_the_real_tensor():
    """The reference sweep is the package's cp_als: 25 sweeps from the same start, same error."""
    from moe_course.factorized import cp_als, cp_to_tensor

    w = ch10.real_expert_tensor()
    factors = ch10.als_init(w, 16)
    for _ in range(25):
        factors = als_sweep(w, factors)
    ours = float((w - cp_to_tensor(factors)).norm() / w.norm())
    _, errors = cp_als(w, 16, n_iter=25, tol=-1.0)
    assert abs(ours - errors[-1]) < 1e-6


def test_als_stale_factors_caught():
    """Every factor solved against the OLD others (a Jacobi sweep) is caught with its hint."""
    def stale(X, factors):
        return ch10._sweep(X, [f.clone() for f in factors], fresh=False)
    r = run(ch10.check_als_sweep, stale)
    assert r.status == FAIL


# ---------------------------------------------------------------- 10.4 replace_with_mumoe
def replace_with_mumoe(model, layer_index, calib, steps=400):
    torch.manual_seed(0)
    out = copy.deepcopy(model)
    layer = moe_layers(out)[layer_index]
    x = layer_inputs(model, calib)[layer_index]
    with torch.no_grad():
        y = layer(x)
    d, f = layer.experts.d_model, layer.experts.d_hidden
    budget = sum(p.numel() for p in layer.experts.parameters()) // 4
    rank = max(r for r in range(1, 512) if cp_mumoe_params(d, d, 64, r, hidden_features=f) <= budget)
    block = MuMoEBlock(d, f, 64, "cp", rank=rank)
    opt = torch.optim.Adam(block.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (512,))
        loss = (block(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    next(b for b in out.blocks if b.ffn is layer).ffn = block.eval()
    return out


def test_replacement_reference_meets_the_target(capsys):
    r = ch10.check_mumoe_replacement(replace_with_mumoe)  # not quiet: it prints its summary
    assert r.status == PASS, r.message
    assert "perplexity" in capsys.readouterr().out


def test_replacement_weak_attempt_fails():
    """Both ways: the same block without training misses the perplexity target."""
    r = run(ch10.check_mumoe_replacement, lambda m, i, c: replace_with_mumoe(m, i, c, steps=0))
    assert r.status == FAIL and "no better than dropping the layer" in r.message
