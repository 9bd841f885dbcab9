"""Checkers for chapter 9, trimming: the layer-drop similarity and the best contiguous run of blocks.

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.trimming.residual_similarity` and
:func:`~moe_course.compress.trimming.best_contiguous_run`) on hand-made, random and edge cases and
recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_course.compress.trimming import best_contiguous_run, residual_similarity

from .core import CheckFailed, checker, expect

__all__ = ["check_residual_similarity", "check_best_contiguous_run"]


# --------------------------------------------------------------------------------------------
# Exercise 9.1: residual similarity of an MoE sub-layer
# --------------------------------------------------------------------------------------------
def _sim_variants(h: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    h, out = h.double(), out.double()
    return {
        "no_residual": float(F.cosine_similarity(h, out, dim=-1).mean()),
        "wrong_dim": float(F.cosine_similarity(h, h + out, dim=0).mean()),
        "flattened": float(F.cosine_similarity(h.reshape(1, -1), (h + out).reshape(1, -1), dim=-1).mean()),
        "distance": 1.0 - float(F.cosine_similarity(h, h + out, dim=-1).mean()),
        "minus": float(F.cosine_similarity(h, h - out, dim=-1).mean()),
    }


_SIM_HINTS = {
    "no_residual": "you compared h with the layer's OUTPUT: compare h with h + out (the hidden state after the "
                   "residual update); a layer that outputs zero must have similarity 1",
    "wrong_dim": "you took the cosine along the token dimension (dim=0): take it per token along the feature "
                 "dimension (dim=-1), then average over tokens",
    "flattened": "you took one cosine between the flattened matrices: take one cosine per token (dim=-1), then the mean",
    "distance": "that is 1 - similarity (a cosine distance): return the mean cosine SIMILARITY, which is 1 for a "
                "layer that changes nothing",
    "minus": "the residual update ADDS the layer's output: compare h with h + out, not h - out",
}


def _as_float(v, desc):
    if torch.is_tensor(v):
        if v.numel() != 1:
            raise CheckFailed(f"return one number (the MEAN over tokens), got a tensor of shape {tuple(v.shape)} "
                              f"(did you forget .mean()?) {desc}")
        v = v.item()
    if not isinstance(v, (int, float)):
        raise CheckFailed(f"return a float, got {type(v).__name__} {desc}")
    return float(v)


@checker("Exercise 9.1: residual similarity")
def check_residual_similarity(residual_similarity_fn) -> None:
    g = torch.Generator().manual_seed(9)
    h0 = torch.randn(12, 6, generator=g)
    cases = [(h0, 0.3 * torch.randn(12, 6, generator=g), "small output"),
             (h0, torch.randn(12, 6, generator=g) * torch.linspace(0.1, 3, 12)[:, None], "mixed sizes"),
             (torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g), "random"),
             (h0, torch.zeros_like(h0), "zero output")]
    for h, out, what in cases:
        desc = f"(h and out of shape {tuple(h.shape)}, {what})"
        got = _as_float(residual_similarity_fn(h.clone(), out.clone()), desc)
        ref = residual_similarity(h, out)
        if not math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-5):
            for name, v in _sim_variants(h, out).items():
                if math.isclose(got, v, rel_tol=1e-4, abs_tol=1e-5):
                    raise CheckFailed(f"{_SIM_HINTS[name]} {desc}")
            raise CheckFailed(f"expected mean_t cos(h_t, h_t + out_t) = {ref:.5f}, got {got:.5f} {desc}")
    got = _as_float(residual_similarity_fn(h0, torch.zeros_like(h0)), "(zero output)")
    expect(math.isclose(got, 1.0, abs_tol=1e-5), "a layer whose output is zero leaves h unchanged: similarity 1")


# --------------------------------------------------------------------------------------------
# Exercise 9.2: best contiguous run of blocks to drop
# --------------------------------------------------------------------------------------------
def _mean_cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def _hidden_cases():
    g = torch.Generator().manual_seed(19)
    h = torch.randn(16, 8, generator=g)
    # blocks 2 and 3 barely change h: the best run of 2 starts at 2, of 1 at 2 or 3
    planted = [torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), h,
               h + 0.01 * torch.randn(16, 8, generator=g), h + 0.02 * torch.randn(16, 8, generator=g),
               torch.randn(16, 8, generator=g)]
    cases = [(planted, 2), (planted, 1), (planted, 3)]
    base = torch.randn(16, 8, generator=g)
    walk = [base]
    for i in range(6):  # a random walk: steps of different sizes
        walk.append(walk[-1] + (0.2 + i % 3) * torch.randn(16, 8, generator=g))
    cases += [(walk, 1), (walk, 2), (walk, 4), (walk, 6)]
    # A run that drifts away and comes back: block 0 moves h far away, block 1 brings it back, so the run
    # 0..1 leaves h unchanged although each of its blocks changes it a lot; blocks 3..5 each change h a
    # little, but add up to a larger change. The endpoints decide.
    a = torch.randn(16, 8, generator=g)
    drift = [torch.randn(16, 8, generator=g)]
    for _ in range(3):
        drift.append(drift[-1] + 0.45 * torch.randn(16, 8, generator=g))
    back = [a, torch.randn(16, 8, generator=g), a + 0.01 * torch.randn(16, 8, generator=g)] + drift
    cases += [(back, 2)]
    # The best run is the LAST one (start L - n), again one that comes back.
    d = torch.randn(16, 8, generator=g)
    last = [torch.randn(16, 8, generator=g) for _ in range(3)] + [d, torch.randn(16, 8, generator=g),
                                                                  d + 0.01 * torch.randn(16, 8, generator=g)]
    cases += [(last, 2)]
    return cases


def _tie_case():
    """Every block is the identity: all runs tie exactly, and the earliest (b = 0) wins."""
    h = torch.randn(16, 8, generator=torch.Generator().manual_seed(29))
    return [h.clone() for _ in range(5)], 2


@checker("Exercise 9.2: best contiguous run of blocks")
def check_best_contiguous_run(best_run_fn) -> None:
    tie_hidden, tie_n = _tie_case()
    for hidden, n in _hidden_cases() + [(tie_hidden, tie_n)]:
        L = len(hidden) - 1
        desc = f"({L} blocks, n={n})"
        got = best_run_fn([x.clone() for x in hidden], n)
        if torch.is_tensor(got):
            got = got.item()
        if isinstance(got, tuple):
            raise CheckFailed(f"return only the start index b (an int), got a tuple {desc}")
        if not isinstance(got, int):
            raise CheckFailed(f"return the start index b as an int, got {type(got).__name__} {desc}")
        ref, _ = best_contiguous_run(hidden, n)
        sims = [_mean_cos(hidden[b], hidden[b + n]) for b in range(L - n + 1)]
        if 0 <= got < len(sims) and got > ref and sims[got] == sims[ref]:
            raise CheckFailed(f"b = {got} and b = {ref} are equally good (similarity {sims[ref]:.4f}): ties go to the "
                              f"EARLIEST run, b = {ref} (max() and torch.argmax return the first maximum; a loop "
                              f"needs >, not >=) {desc}")
        if got == ref or (0 <= got < len(sims) and math.isclose(sims[got], sims[ref], abs_tol=1e-9)):
            continue
        if not 0 <= got <= L - n:
            raise CheckFailed(f"b = {got} is not a valid start: a run of n blocks starts at 0 .. L - n = {L - n} {desc}")
        if ref == L - n and got == max(range(L - n), key=lambda b: sims[b]):
            raise CheckFailed(f"the last run, starting at b = L - n = {L - n}, is a candidate too (and the best here): "
                              f"try b in range(L - n + 1) {desc}")
        steps = [_mean_cos(hidden[b], hidden[b + 1]) for b in range(L)]
        for pool in (sum, min):
            score = [pool(steps[b:b + n]) for b in range(L - n + 1)]
            if n > 1 and got == max(range(len(score)), key=lambda b: score[b]):
                raise CheckFailed(f"you scored the run by its blocks one at a time ({pool.__name__} of the "
                                  f"per-block similarities); a run is judged by its endpoints, mean_t "
                                  f"cos(h_b, h_(b+n)): the blocks of a run may move h away and back {desc}")
        off = [_mean_cos(hidden[b], hidden[b + n - 1]) for b in range(L - n + 2)]
        if got == max(range(len(off)), key=lambda b: off[b]) and (n > 1 or got == 0):
            raise CheckFailed(f"off by one: a run of n blocks b .. b+n-1 takes h_b to h_(b+n), compare hidden[b] "
                              f"with hidden[b + n], not hidden[b + n - 1] {desc}")
        worst = min(range(len(sims)), key=lambda b: sims[b])
        if got == worst:
            raise CheckFailed(f"you picked the run with the LOWEST similarity: drop the run whose input and output "
                              f"are MOST similar (argmax) {desc}")
        raise CheckFailed(f"expected b = {ref} (similarity {sims[ref]:.4f}), got b = {got} "
                          f"(similarity {sims[got]:.4f}) {desc}")
