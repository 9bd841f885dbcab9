"""Checkers for chapter 7, low-rank experts: truncated-SVD factors and the rank for a retained energy.

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.lowrank.truncated_svd` and
:func:`~moe_course.compress.lowrank.rank_for_energy`) on a hand-made case, random cases and edge
cases, and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import torch

from moe_course.compress.lowrank import rank_for_energy, truncated_svd

from .core import CheckFailed, checker, expect

__all__ = ["check_svd_factors", "check_rank_for_energy"]


# --------------------------------------------------------------------------------------------
# Exercise 7.1: truncated SVD factors
# --------------------------------------------------------------------------------------------
def _matrix(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # distinct, decaying singular values: the truncation is unique
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    s = torch.linspace(3.0, 0.2, k) ** 2
    return (u[:, :k] * s) @ v[:, :k].T


@checker("Exercise 7.1: truncated SVD factors L = U_r S_r^(1/2), R = S_r^(1/2) V_r^T")
def check_svd_factors(svd_factors) -> None:
    cases = [(_matrix(6, 4, 0), 2), (_matrix(12, 20, 1), 5), (_matrix(16, 8, 2), 1), (_matrix(8, 8, 3), 8)]
    for w, r in cases:
        desc = f"(w of shape {tuple(w.shape)}, rank={r})"
        out = svd_factors(w.clone(), r)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
            raise CheckFailed(f"return a pair of tensors (L, R), got {type(out).__name__} {desc}")
        left, right = out
        m, n = w.shape
        ref_l, ref_r = truncated_svd(w, r)
        if (tuple(left.shape), tuple(right.shape)) != ((m, r), (r, n)) and (left.shape == (r, m) or right.shape == (n, r)):
            raise CheckFailed(f"L must have shape [m, r] = {(m, r)} and R [r, n] = {(r, n)}, got {tuple(left.shape)} "
                              f"and {tuple(right.shape)}: check your transposes (R = S_r^(1/2) Vh[:r], Vh is "
                              f"already V^T) {desc}")
        expect(tuple(left.shape) == (m, r) and tuple(right.shape) == (r, n),
               f"L must have shape [m, r] = {(m, r)} and R [r, n] = {(r, n)}, got {tuple(left.shape)} and "
               f"{tuple(right.shape)} {desc}")
        prod, ref = left.double() @ right.double(), (ref_l.double() @ ref_r.double())
        if not torch.allclose(prod, ref, atol=1e-4, rtol=1e-4):
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            smallest = (u[:, -r:] * s[-r:]) @ vh[-r:]
            if torch.allclose(prod, smallest, atol=1e-4):
                raise CheckFailed(f"you kept the r SMALLEST singular values: torch.linalg.svd returns them in "
                                  f"descending order, so keep the first r (u[:, :r], s[:r], vh[:r]) {desc}")
            if torch.allclose(prod, (u[:, :r] * s[:r] ** 2) @ vh[:r], atol=1e-4):
                raise CheckFailed(f"Sigma is applied twice: L @ R gives U_r S_r^2 V_r^T; each factor carries the "
                                  f"SQUARE ROOT, L = U_r S_r^(1/2) and R = S_r^(1/2) Vh[:r] {desc}")
            wrong_t = (u[:, :r] * s[:r].sqrt()) @ (s[:r].sqrt()[:, None] * vh.T[:r]) if vh.shape[0] == vh.shape[1] else None
            if wrong_t is not None and torch.allclose(prod, wrong_t, atol=1e-4):
                raise CheckFailed(f"wrong transpose: torch.linalg.svd returns Vh = V^T already, so R = S_r^(1/2) "
                                  f"Vh[:r] (rows of Vh), not columns {desc}")
            raise CheckFailed(f"L @ R must equal the best rank-{r} approximation U_r S_r V_r^T (Eckart-Young); "
                              f"the error is {float((prod - ref).abs().max()):.3g} {desc}")
        ln, rn = left.double().norm(), right.double().norm()
        if not torch.allclose(ln, rn, rtol=1e-3):
            raise CheckFailed(f"L @ R is right, but Sigma is not split: both factors must carry S_r^(1/2) "
                              f"(||L||_F = ||R||_F = sqrt(sum of the kept singular values)); here ||L||_F = "
                              f"{float(ln):.3f}, ||R||_F = {float(rn):.3f} {desc}")
        gram = left.double().T @ left.double()
        expect(torch.allclose(gram, torch.diag(torch.diag(gram)), atol=1e-4),
               f"the columns of L must be orthogonal (L = U_r S_r^(1/2)) {desc}")


# --------------------------------------------------------------------------------------------
# Exercise 7.2: the rank that keeps a fraction of the energy
# --------------------------------------------------------------------------------------------
def _cum_energy(s: torch.Tensor) -> torch.Tensor:
    e = s.double().square()
    return e.cumsum(0) / e.sum()


@checker("Exercise 7.2: smallest rank keeping a fraction of the energy sum(sigma^2)")
def check_rank_for_energy(rank_for_energy_fn) -> None:
    hand = torch.tensor([4.0, 2.0, 1.0, 1.0])  # sigma^2 = 16, 4, 1, 1 -> cumulative 16/22, 20/22, 21/22, 1
    cases = [(hand, 0.5), (hand, 0.75), (hand, 0.9), (hand, 0.95), (hand, 1.0), (hand, 0.01)]
    # Targets met exactly (exact in binary), so the answer is the rank that REACHES them (>=, not >):
    # sigma^2 = 9, 4, 1, 1, 1 -> cumulative 0.5625, 0.8125, ... : energy 0.8125 needs rank 2;
    # four equal values -> cumulative 0.25, 0.5, ... : energy 0.5 needs rank 2.
    cases += [(torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0]), 0.8125), (torch.ones(4), 0.5)]
    g = torch.Generator().manual_seed(0)
    for n in (8, 32, 64):
        s = torch.sort(torch.rand(n, generator=g) ** 3 * 5, descending=True).values
        cases += [(s, e) for e in (0.3, 0.8, 0.99)]
    for s, e in cases:
        desc = f"(singular values {[round(v, 3) for v in s[:6].tolist()]}{'...' if s.numel() > 6 else ''}, energy={e})"
        out = rank_for_energy_fn(s.clone(), e)
        if torch.is_tensor(out):
            out = out.item()
        if not isinstance(out, int) or isinstance(out, bool):
            if isinstance(out, float) and out.is_integer():
                out = int(out)
            else:
                raise CheckFailed(f"return an int (the rank), got {type(out).__name__} {out!r} {desc}")
        ref = rank_for_energy(s, e)
        if out == ref:
            continue
        lin = s / s.sum()
        on_sigma = min(int((lin.cumsum(0) < e - 1e-9).sum()) + 1, s.numel())
        if out == on_sigma:
            raise CheckFailed(f"you measured energy on sigma: it is the sum of SQUARED singular values (the squared "
                              f"Frobenius norm kept by the approximation), expected {ref}, got {out} {desc}")
        if out == min(int((_cum_energy(s.flip(0)) < e - 1e-9).sum()) + 1, s.numel()) and s[0] != s[-1]:
            raise CheckFailed(f"you accumulated the energy from the SMALLEST singular value: they come in descending "
                              f"order (not ascending); keep the largest ones first, expected {ref}, got {out} {desc}")
        if out == ref - 1:
            raise CheckFailed(f"off by one: return the number of singular values kept (the first r with cumulative "
                              f"energy >= energy is index r - 1), expected {ref}, got {out} {desc}")
        if out == ref + 1:
            raise CheckFailed(f"one too many: stop at the FIRST r whose cumulative energy reaches the target "
                              f"(>=, not >), expected {ref}, got {out} {desc}")
        raise CheckFailed(f"expected rank {ref}, got {out}: r = smallest r with sum(s[:r]**2) >= energy * "
                          f"sum(s**2) {desc}")
    expect(1 <= rank_for_energy_fn(torch.tensor([1.0, 0.0, 0.0]), 1.0) <= 1,
           "singular values that are 0 carry no energy: with [1, 0, 0] and energy=1 the rank is 1")
