"""Checkers for chapter 10, μMoE: entmax-1.5, the CPμMoE and TRμMoE forward passes, rank for a budget.

Each checker compares the student's function with the package's reference
(:func:`moe_course.factorized.entmax15`, :class:`~moe_course.factorized.CPMuMoE`,
:class:`~moe_course.factorized.TRMuMoE`, :func:`~moe_course.factorized.cp_rank_for_budget`) on a
hand-made case, random cases and edge cases, and recognises the usual wrong answers (z not
halved, sparsemax or softmax instead of entmax, the bias row forgotten, a sum instead of the
elementwise product, the tensor ring closed the wrong way round, the weight tensor materialised, the gate
left out of the parameter count) so that the hint names the mistake.
"""

from __future__ import annotations

import math

import torch

from moe_course.factorized import cp_mumoe_params, cp_rank_for_budget, entmax15, tr_to_tensor

from .core import CheckFailed, LargestIntermediate, checker, expect, expect_close

__all__ = ["check_entmax15", "check_cp_mumoe_forward", "check_tr_mumoe_forward", "check_cp_rank_for_budget"]


def _close(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return False
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))


def _diagnose(out, ref, variants, hints: dict[str, str], what: str, otherwise: str) -> None:
    """Pass if ``out`` matches ``ref``; else name the typical mistake whose output it matches
    (``variants()``: {name: wrong output}, computed only on a mismatch), else fail with ``otherwise``."""
    if _close(out, ref):
        return
    for name, value in variants().items():
        if _close(out, value):
            raise CheckFailed(f"{what}: {hints[name]}")
    raise CheckFailed(f"{what}: {otherwise}")


# --------------------------------------------------------------------------------------------
# Exercise 10.1: entmax-1.5
# --------------------------------------------------------------------------------------------
def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    tau = (zs.cumsum(-1) - 1) / k
    support = (zs > tau).sum(-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)).clamp(min=0)


def _entmax_unclamped(z: torch.Tensor) -> torch.Tensor:
    """``(z/2 - tau)^2`` with the right tau but without ``[.]_+``: entries below the threshold come back positive."""
    z = (z - z.max(dim=-1, keepdim=True).values) / 2
    zs = z.sort(dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean, mean_sq = zs.cumsum(-1) / k, (zs ** 2).cumsum(-1) / k
    tau = mean - ((1 - k * (mean_sq - mean ** 2)) / k).clamp(min=0).sqrt()
    support = (tau <= zs).sum(dim=-1, keepdim=True)
    return (z - tau.gather(-1, support - 1)) ** 2


def _entmax_variants(z: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "softmax": torch.softmax(z, dim=-1),
        "not_halved": entmax15(2 * z),
        "sparsemax": _sparsemax(z),
        "wrong_axis": entmax15(z, dim=0),
        "no_clamp": _entmax_unclamped(z),
    }


_ENTMAX_HINTS = {
    "softmax": "this is softmax: entmax-1.5 gives exact zeros, p_i = [z_i/2 - tau]_+^2 with tau chosen so that "
               "the p_i sum to 1",
    "not_halved": "your output is entmax of 2z: the formula uses z_i / 2, p_i = [z_i/2 - tau]_+^2 "
                  "(halve the logits first)",
    "sparsemax": "this is sparsemax (alpha = 2), p_i = [z_i - tau]_+: entmax-1.5 halves the logits and SQUARES the "
                 "thresholded values, p_i = [z_i/2 - tau]_+^2, so tau solves a quadratic, not a linear equation",
    "wrong_axis": "you normalised over the wrong axis: each ROW (the last dimension, one distribution over the "
                  "experts per token) must sum to 1",
    "no_clamp": "clamp z/2 - tau at 0 BEFORE squaring, p_i = [z_i/2 - tau]_+^2: without the clamp the experts below "
                "the threshold come back with positive values instead of exact zeros",
}


def _entmax_case(student_fn, z: torch.Tensor, what: str) -> torch.Tensor:
    out = student_fn(z.clone())
    expect(torch.is_tensor(out), f"entmax15 must return a torch tensor, got {type(out).__name__}")
    expect(tuple(out.shape) == tuple(z.shape),
           f"{what}: the output must have the input's shape {tuple(z.shape)}, got {tuple(out.shape)}")
    ref = entmax15(z)
    if _close(out, ref, rtol=1e-4, atol=2e-6):
        return out
    expect(bool(torch.isfinite(out).all()), f"{what}: your output contains inf or nan")
    for name, value in _entmax_variants(z).items():
        if not _close(value, ref, rtol=1e-4, atol=1e-5) and _close(out, value, rtol=1e-4, atol=2e-6):
            raise CheckFailed(f"{what}: {_ENTMAX_HINTS[name]}")
    sums = out.detach().double().sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        raise CheckFailed(f"{what}: the rows sum to {sums.min():.4f}..{sums.max():.4f}, not 1. tau must be the root "
                          "of sum_i [z_i/2 - tau]_+^2 = 1 for the right support: with the sorted values, "
                          "tau_k = mean_k - sqrt((1 - k (meansq_k - mean_k^2)) / k) and the support size is the "
                          "largest k with tau_k <= z_(k)/2; index tau with support - 1 (0-based)")
    raise CheckFailed(f"{what}: values differ from the reference (max |diff| = "
                      f"{(out.detach().double() - ref.double()).abs().max():.3g}). Check tau: support size = the "
                      "number of k with tau_k <= z_(k)/2, and p = clamp(z/2 - tau, min=0) ** 2")


@checker("Exercise 10.1: entmax15")
def check_entmax15(student_fn) -> None:
    """``entmax15(z [T, N]) -> p [T, N]``: rows sum to 1, sparse, equal to the package's entmax15."""
    # Random rows first: they tell the usual mistakes apart (small hand-made rows cannot).
    for t, n, scale in ((16, 8, 1.0), (32, 64, 3.0), (5, 2, 0.5), (1, 10, 2.0), (7, 1, 1.0), (64, 32, 0.1)):
        out = _entmax_case(student_fn, torch.randn(t, n) * scale, f"random logits (T={t}, N={n}, scale {scale})")
        expect(bool((out >= 0).all()), "probabilities must be >= 0")
    # Hand-made: a gap of 3 between the top two logits leaves one expert; equal logits give 1/N.
    out = _entmax_case(student_fn, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, -5.0]]),
                       "the hand-made rows [3, 0, 0], [0, 0, 0], [1, 0, -5]")
    expect(bool((out[0] == torch.tensor([1.0, 0.0, 0.0])).all()),
           "entmax15([3, 0, 0]) must be exactly [1, 0, 0]: clamp the thresholded values at 0 before squaring")

    # Large logits: entmax is shift invariant, but cumulative sums of squares of ~1000 lose float32 precision
    z = torch.randn(16, 12) * 2
    out = student_fn(z + 1000.0)
    expect(torch.is_tensor(out) and _close(out, entmax15(z), rtol=1e-3, atol=1e-4),
           "wrong result for logits around 1000 (entmax15(z + 1000) must equal entmax15(z)): subtract each row's "
           "maximum first; with large values mean_sq - mean^2 loses all float32 precision")

    # Differentiable, with the right gradient (autograd through sort / cumsum / gather is fine).
    z = (torch.randn(12, 9) * 2).requires_grad_(True)
    out = student_fn(z)
    expect(out.requires_grad, "the output carries no gradient: build it from z with torch operations (no .detach(), "
                              "no numpy, no torch.no_grad)")
    probe = torch.randn(12, 9)
    (out * probe).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (entmax15(z_ref) * probe).sum().backward()
    expect(z.grad is not None, "no gradient reached z")
    expect_close(z.grad, z_ref.grad, "the gradient differs from the reference: compute p with differentiable torch "
                                      "operations from z (tau must depend on z too, not be detached)",
                 rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Exercise 10.2: the CPμMoE forward pass
# --------------------------------------------------------------------------------------------
def _cp_reference(z, a, u_exp, u_in, u_out) -> torch.Tensor:
    z_bar = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
    return ((a @ u_exp) * (z_bar @ u_in)) @ u_out.T


def _cp_variants(z, a, u_exp, u_in, u_out) -> dict[str, torch.Tensor]:
    ones = torch.ones(z.shape[0], 1, dtype=z.dtype)
    return {
        "no_bias": ((a @ u_exp) * (z @ u_in[:-1])) @ u_out.T,
        "bias_first": ((a @ u_exp) * (torch.cat([ones, z], 1) @ u_in)) @ u_out.T,
        "sum": ((a @ u_exp) + (torch.cat([z, ones], 1) @ u_in)) @ u_out.T,
        "no_experts": (torch.cat([z, ones], 1) @ u_in) @ u_out.T,
    }


_CP_HINTS = {
    "no_bias": "the bias is missing: U_in has I+1 rows, the last one multiplies the constant 1 appended to z "
               "(z_bar = [z, 1])",
    "bias_first": "the 1 is appended at the wrong end: z_bar = [z, 1], so the LAST row of U_in is the bias",
    "sum": "you added the two R-vectors: CP is multilinear, combine (a U_exp) and (z_bar U_in) with an elementwise "
           "product, then multiply by U_out^T",
    "no_experts": "the expert coefficients are ignored: multiply elementwise by a @ U_exp",
}


def _call_cp(student_fn, z, a, u_exp, u_in, u_out, what: str) -> torch.Tensor:
    out = student_fn(z.clone(), a.clone(), u_exp, u_in, u_out)
    expect(torch.is_tensor(out), f"cp_mumoe_forward must return a torch tensor, got {type(out).__name__}")
    want = (z.shape[0], u_out.shape[0])
    expect(tuple(out.shape) == want, f"{what}: expected an output of shape {want} ([T, O]), got {tuple(out.shape)}")
    return out


def _cp_case(student_fn, t: int, n: int, i: int, o: int, r: int, what: str) -> None:
    z, a = torch.randn(t, i), torch.softmax(torch.randn(t, n) * 2, dim=-1)
    u_exp, u_in, u_out = torch.randn(n, r) + 1, torch.randn(i + 1, r) / math.sqrt(i), torch.randn(o, r) / math.sqrt(r)
    out = _call_cp(student_fn, z, a, u_exp, u_in, u_out, what)
    _diagnose(out, _cp_reference(z, a, u_exp, u_in, u_out), lambda: _cp_variants(z, a, u_exp, u_in, u_out),
              _CP_HINTS, what, "values differ from y = ((a U_exp) * (z_bar U_in)) U_out^T, the contraction of the "
              "CP tensor W[n,i,o] = sum_r U_exp[n,r] U_in[i,r] U_out[o,r] with a and z_bar")


@checker("Exercise 10.2: cp_mumoe_forward")
def check_cp_mumoe_forward(student_fn) -> None:
    """``cp_mumoe_forward(z [T,I], a [T,N], U_exp [N,R], U_in [I+1,R], U_out [O,R]) -> y [T,O]``."""
    for t, n, i, o, r in ((16, 8, 10, 6, 4), (5, 64, 12, 9, 16), (1, 3, 4, 2, 1), (32, 1, 8, 8, 5)):
        _cp_case(student_fn, t, n, i, o, r, f"random case (T={t}, N={n}, I={i}, O={o}, R={r})")
    # Hand-made: one expert, rank 1 -> y = a U_exp (z . u_in + bias) u_out, checkable on paper.
    z = torch.tensor([[1.0, 2.0]])
    a = torch.tensor([[1.0]])
    u_exp, u_in, u_out = torch.tensor([[2.0]]), torch.tensor([[1.0], [1.0], [0.5]]), torch.tensor([[1.0], [-1.0], [3.0]])
    out = _call_cp(student_fn, z, a, u_exp, u_in, u_out, "the hand-made case")
    expect(_close(out, torch.tensor([[7.0, -7.0, 21.0]])),
           f"hand-made case: 1 expert, rank 1, z = [1, 2], U_in = [1, 1, 0.5] (bias 0.5), U_exp = 2, "
           f"U_out = [1, -1, 3] must give 2 * (1 + 2 + 0.5) * U_out = [7, -7, 21]; got {out.detach().flatten().tolist()}")

    # Many experts: the weight tensor N (I+1) O has 1.1M entries; the factorised path never needs it.
    t, n, i, o, r = 8, 256, 64, 64, 16
    z, a = torch.randn(t, i), torch.softmax(torch.randn(t, n), -1)
    factors = (torch.randn(n, r) + 1, torch.randn(i + 1, r) / 8, torch.randn(o, r) / 4)
    with LargestIntermediate() as mode:
        out = _call_cp(student_fn, z, a, *factors, "256 experts")
    expect_close(out, _cp_reference(z, a, *factors), "wrong output with 256 experts")
    expect(mode.largest < n * (i + 1) * o // 8,
           f"your code built a tensor of {mode.largest} entries, the size of the weight tensor W (N (I+1) O = "
           f"{n * (i + 1) * o}) or of a per-token weight: never materialise W; contract each factor with its own "
           "vector first (a @ U_exp and z_bar @ U_in), multiply elementwise, then apply U_out")

    # Gradients reach the input and every factor.
    z = torch.randn(6, 5, requires_grad=True)
    a = torch.softmax(torch.randn(6, 4), -1).requires_grad_(True)
    fs = [torch.randn(4, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)]
    out = student_fn(z, a, *fs)
    expect(out.requires_grad, "the output carries no gradient: use torch operations on the inputs (no .detach())")
    out.sum().backward()
    expect(all(t.grad is not None for t in (z, a, *fs)),
           "some input received no gradient: z, a and all three factors must take part in the computation")


# --------------------------------------------------------------------------------------------
# Exercise 10.3: the TRμMoE forward pass
# --------------------------------------------------------------------------------------------
def _tr_reference(z, a, g1, g2, g3) -> torch.Tensor:
    z_bar = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
    w = tr_to_tensor([g1, g2, g3])
    return torch.einsum("tn,ti,nio->to", a, z_bar, w)


def _tr_variants(z, a, g1, g2, g3) -> dict[str, torch.Tensor]:
    ones = torch.ones(z.shape[0], 1, dtype=z.dtype)
    z_bar = torch.cat([z, ones], 1)
    m = torch.bmm(torch.einsum("tn,anb->tab", a, g1), torch.einsum("ti,bic->tbc", z_bar, g2))
    out = {"no_bias": torch.bmm(torch.einsum("tn,anb->tab", a, g1), torch.einsum("ti,bic->tbc", z, g2[:, :-1]))}
    out["no_bias"] = torch.einsum("tac,coa->to", out["no_bias"], g3)
    first = torch.bmm(torch.einsum("tn,anb->tab", a, g1), torch.einsum("ti,bic->tbc", torch.cat([ones, z], 1), g2))
    out["bias_first"] = torch.einsum("tac,coa->to", first, g3)
    if g3.shape[0] == g3.shape[2]:
        out["ring_transposed"] = torch.einsum("tac,aoc->to", m, g3)
    return out


_TR_HINTS = {
    "no_bias": "the bias is missing: the input core has I+1 slices, the last one multiplies the 1 appended to z",
    "bias_first": "the 1 is appended at the wrong end: z_bar = [z, 1], so the LAST slice of G2 along its middle mode "
                  "is the bias",
    "ring_transposed": "the ring is closed the wrong way round: W[n,i,o] = trace(G1[:,n,:] G2[:,i,:] G3[:,o,:]), so "
                       "with M = A B of shape [r1, r3] the output is y_o = sum_{a,c} G3[c, o, a] M[a, c] "
                       "(G3 has shape [r3, O, r1])",
}


def _tr_case(student_fn, t: int, n: int, i: int, o: int, ranks: tuple[int, int, int], what: str) -> None:
    r1, r2, r3 = ranks
    z, a = torch.randn(t, i), torch.softmax(torch.randn(t, n) * 2, dim=-1)
    g1 = torch.randn(r1, n, r2) / math.sqrt(r1)
    g2 = torch.randn(r2, i + 1, r3) / math.sqrt(i * r2)
    g3 = torch.randn(r3, o, r1) / math.sqrt(r3)
    out = student_fn(z.clone(), a.clone(), g1, g2, g3)
    expect(torch.is_tensor(out), f"tr_mumoe_forward must return a torch tensor, got {type(out).__name__}")
    expect(tuple(out.shape) == (t, o), f"{what}: expected an output of shape {(t, o)} ([T, O]), got {tuple(out.shape)}")
    _diagnose(out, _tr_reference(z, a, g1, g2, g3), lambda: _tr_variants(z, a, g1, g2, g3), _TR_HINTS, what,
              "values differ from the tensor-ring layer: A = sum_n a_n G1[:,n,:], "
              "B = sum_i z_bar_i G2[:,i,:], M = A B, y_o = sum_{a,c} G3[c,o,a] M[a,c]")


@checker("Exercise 10.3: tr_mumoe_forward")
def check_tr_mumoe_forward(student_fn) -> None:
    """``tr_mumoe_forward(z [T,I], a [T,N], G1 [r1,N,r2], G2 [r2,I+1,r3], G3 [r3,O,r1]) -> y [T,O]``."""
    for t, n, i, o, ranks in ((10, 6, 5, 4, (2, 3, 2)), (16, 32, 12, 8, (4, 4, 6)), (1, 2, 3, 2, (1, 1, 1)),
                              (8, 5, 7, 9, (3, 2, 4)), (4, 1, 6, 3, (2, 2, 2))):
        _tr_case(student_fn, t, n, i, o, ranks, f"random case (T={t}, N={n}, I={i}, O={o}, ranks {ranks})")

    t, n, i, o = 8, 256, 64, 64
    z, a = torch.randn(t, i), torch.softmax(torch.randn(t, n), -1)
    cores = (torch.randn(4, n, 4) / 2, torch.randn(4, i + 1, 8) / 16, torch.randn(8, o, 4) / 6)
    with LargestIntermediate() as mode:
        out = student_fn(z, a, *cores)
    expect(torch.is_tensor(out), f"tr_mumoe_forward must return a torch tensor, got {type(out).__name__}")
    expect_close(out, _tr_reference(z, a, *cores), "wrong output with 256 experts")
    expect(mode.largest < n * (i + 1) * o // 8,
           f"your code built a tensor of {mode.largest} entries, the size of the weight tensor W (N (I+1) O = "
           f"{n * (i + 1) * o}) or of a per-token weight: never materialise W; contract a with G1 and z_bar with G2 "
           "first, multiply the small [r1, r2] and [r2, r3] matrices per token, then contract with G3")

    z = torch.randn(5, 4, requires_grad=True)
    cores = [torch.randn(2, 3, 2, requires_grad=True), torch.randn(2, 5, 3, requires_grad=True),
             torch.randn(3, 6, 2, requires_grad=True)]
    out = student_fn(z, torch.softmax(torch.randn(5, 3), -1), *cores)
    expect(out.requires_grad, "the output carries no gradient: use torch operations on the inputs (no .detach())")
    out.sum().backward()
    expect(all(c.grad is not None for c in (z, *cores)), "some input received no gradient: z and all three cores "
                                                         "must take part in the computation")


# --------------------------------------------------------------------------------------------
# Exercise 10.4: CP rank for a parameter budget
# --------------------------------------------------------------------------------------------
def _rank_variants(budget: int, d: int, h: int, n: int) -> dict[str, int]:
    two_layers = (n + d + 1 + h) + (n + h + 1 + d)
    return {
        "no_gate": budget // two_layers,
        "no_bias": (budget - d * n) // (two_layers - 2),
        "ceil": math.ceil((budget - d * n) / two_layers),
        "one_layer": (budget - d * n) // (n + d + 1 + h),
        "gate_per_layer": (budget - 2 * d * n) // two_layers,
        "strict": math.ceil((budget - d * n) / two_layers) - 1,
        "square": (budget - d * n) // (2 * (n + d + 1 + d)),
    }


RAISED = "raised ValueError"  # stands for an answer that raised, in the comparisons below

_RANK_HINTS = {
    "no_gate": "the gate is not counted: it has d_model * num_experts weights (one logit per expert), subtract "
               "them from the budget first",
    "no_bias": "the bias rows are missing: each layer's input factor has (in_features + 1) rows, so a layer "
               "costs R (N + in + 1 + out)",
    "ceil": "you rounded up, which goes over the budget: take the floor (integer division)",
    "one_layer": "a μMoE block has TWO layers (d_model -> d_hidden and d_hidden -> d_model), each with its own three "
                 "factors: add both layers' R (N + in + 1 + out)",
    "gate_per_layer": "the two layers SHARE one gate (the same coefficients drive both): count d_model * N once",
    "strict": "a block of exactly `budget` parameters fits: the rank may use the budget up to and including its "
              "last parameter (<=, not <), which integer division (budget - gate) // per_rank gives",
    "square": "the two layers map d_model -> d_hidden and d_hidden -> d_model: each layer's factors have "
              "(N + in + 1 + out) rows, with d_hidden on one side, not d_model on both",
}


@checker("Exercise 10.4: cp_rank_for_budget")
def check_cp_rank_for_budget(student_fn) -> None:
    """``cp_rank_for_budget(budget, d_model, d_hidden, num_experts) -> int``: the largest R within budget."""
    cases = [(16576, 64, 128, 64), (33088, 64, 256, 64), (4_722_432, 768, 3072, 256), (5000, 16, 32, 8),
             (16576, 64, 128, 16), (10**6, 100, 37, 3), (1000, 8, 8, 1),
             # budgets met exactly: the gate 64 * 64 plus rank 24 (or 1) of 514 parameters each, to the last one
             (4096 + 24 * 514, 64, 128, 64), (4096 + 514, 64, 128, 64)]
    answers, raised = [], {}
    for k, (budget, d, h, n) in enumerate(cases):
        try:
            out = student_fn(budget, d, h, n)
        except ValueError as err:  # wrong on a budget that fits, but first see which mistake explains it
            answers.append(RAISED)
            raised[k] = err
            continue
        expect(isinstance(out, int) and not isinstance(out, bool),
               f"return a Python int (use // or int(...)), got {type(out).__name__} {out!r}")
        answers.append(out)
    refs = [cp_rank_for_budget(b, d, d, n, hidden_features=h) for b, d, h, n in cases]
    if answers != refs:
        # Name the mistake whose answers agree with the student's on every case (one case alone is ambiguous);
        # a variant below rank 1 stands for raising ValueError there.
        variants = [{name: (v if v >= 1 else RAISED) for name, v in _rank_variants(*case).items()} for case in cases]
        bad = next(k for k, (o, r) in enumerate(zip(answers, refs)) if o != r)
        budget, d, h, n = cases[bad]
        where = f"budget={budget}, d_model={d}, d_hidden={h}, num_experts={n}"
        got = "ValueError" if answers[bad] is RAISED else answers[bad]
        for name in _RANK_HINTS:
            if all(v[name] == out for v, out in zip(variants, answers)):
                raise CheckFailed(f"{where}: got {got}, expected {refs[bad]}. {_RANK_HINTS[name]}")
        if answers[bad] is RAISED:
            raise CheckFailed(f"{where}: you raised ValueError ({raised[bad]}) but rank {refs[bad]} fits (the block "
                              f"then has {cp_mumoe_params(d, d, n, refs[bad], hidden_features=h)} <= {budget} "
                              "parameters); raise only when not even rank 1 fits, rank 1 itself is a valid answer")
        what = f"{where}: got {got}, expected {refs[bad]}"
        out = answers[bad]
        if out >= 1 and cp_mumoe_params(d, d, n, out, hidden_features=h) > budget:
            raise CheckFailed(f"{what}: rank {out} needs {cp_mumoe_params(d, d, n, out, hidden_features=h)} "
                              "parameters, over the budget. The block has R [(N + d + 1 + h) + (N + h + 1 + d)] + d N")
        raise CheckFailed(f"{what}. The block has R [(N + d + 1 + h) + (N + h + 1 + d)] + d N parameters: solve "
                          "for the largest integer R that keeps it <= budget")
    # The gate alone may exceed the budget: then no rank fits.
    for budget, d, h, n in ((16576, 64, 128, 256), (100, 8, 8, 16)):
        try:
            out = student_fn(budget, d, h, n)
        except ValueError:
            continue
        raise CheckFailed(f"budget={budget}, d_model={d}, num_experts={n}: the gate alone needs {d * n} parameters, "
                          f"so no rank fits, but you returned {out!r}; raise ValueError (naming the budget) when "
                          "the rank would be < 1")
