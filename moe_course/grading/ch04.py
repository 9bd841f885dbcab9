"""Checkers for chapter 4, pruning: a magnitude-pruning mask and NAEE's restricted router.

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.pruning.magnitude_mask` and
:func:`~moe_course.compress.pruning.restrict_router`) on a hand-made case, random cases and edge
cases, and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import torch

from moe_course.compress.pruning import magnitude_mask, restrict_router

from .core import CheckFailed, checker, expect

__all__ = ["check_magnitude_mask", "check_restrict_router"]


# --------------------------------------------------------------------------------------------
# Exercise 4.1: magnitude-pruning mask
# --------------------------------------------------------------------------------------------
def _mask_variants(w: torch.Tensor, s: float) -> dict[str, torch.Tensor]:
    n = int(round(s * w.numel()))
    flat = w.reshape(-1)

    def drop(order):
        m = torch.ones(w.numel(), dtype=torch.bool)
        m[order[:n]] = False
        return m.view(w.shape)

    out = {
        "signed": drop(flat.argsort()),
        "inverted": ~magnitude_mask(w, s),
        "largest": drop(flat.abs().argsort(descending=True)),
    }
    if w.dim() == 2:
        out["per_row"] = torch.cat([magnitude_mask(r, s) for r in w]).view(w.shape)
    return out


_MASK_HINTS = {
    "signed": "you ranked the signed weights: a large negative weight is important too, rank by |w| (w.abs())",
    "largest": "you removed the LARGEST weights: magnitude pruning removes the smallest |w|",
    "inverted": ("your mask is inverted (or prunes the LARGEST |w|): True must mean 'keep' and the pruned "
                 "(False) entries must be the smallest |w|"),
    "per_row": "you pruned each row separately: the exercise asks for one threshold over the whole tensor",
}


@checker("Exercise 4.1: magnitude-pruning mask")
def check_magnitude_mask(magnitude_mask_fn) -> None:
    hand = torch.tensor([[0.5, -2.0, 0.1, 1.0], [-0.05, 3.0, -0.7, 0.2]])
    cases = [(hand, 0.5), (hand, 0.25), (torch.randn(16, 12), 0.3),
             (torch.randn(8, 32) * torch.linspace(0.1, 3, 8)[:, None], 0.6), (torch.randn(3, 5, 7), 0.9),
             (torch.randn(10, 10), 0.123)]  # s * n = 12.3: round() prunes 12, an interpolated quantile 13
    for w, s in cases:
        desc = f"(weight of shape {tuple(w.shape)}, sparsity={s})"
        out = magnitude_mask_fn(w.clone(), s)
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a bool tensor (True = keep), got {type(out).__name__} {desc}")
        expect(out.shape == w.shape, f"the mask must have the weight's shape {tuple(w.shape)}, got {tuple(out.shape)} {desc}")
        if out.dtype != torch.bool:
            raise CheckFailed(f"return a bool mask (e.g. |w| > threshold), got dtype {out.dtype} {desc}")
        ref = magnitude_mask(w, s)
        if not torch.equal(out, ref):
            for name, v in _mask_variants(w, s).items():
                if torch.equal(out, v):
                    raise CheckFailed(f"{_MASK_HINTS[name]} {desc}")
            n = int(round(s * w.numel()))
            got = int((~out).sum())
            if got != n:
                raise CheckFailed(f"prune exactly round(sparsity * numel) = {n} weights, your mask prunes {got} "
                                  f"(an off-by-one at the threshold?) {desc}")
            raise CheckFailed(f"the pruned weights are not the {n} smallest in |w| {desc}")
    w = torch.randn(4, 4)
    out = magnitude_mask_fn(w.clone(), 0.0)
    expect(torch.is_tensor(out) and bool(out.all()), "sparsity 0 must keep every weight (an all-True mask)")


# --------------------------------------------------------------------------------------------
# Exercise 4.2: router restricted to the kept experts
# --------------------------------------------------------------------------------------------
def _router_variants(logits: torch.Tensor, kept: list[int], k: int) -> dict[str, tuple]:
    kept_t = torch.tensor(kept)
    p = torch.softmax(logits, -1)
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[:, kept_t] = True
    w, i = (p * mask).topk(k, -1)  # softmax over ALL experts, then masking, no renormalisation
    sub_w, sub_i = torch.softmax(logits[:, kept_t], -1).topk(k, -1)
    sub_w = sub_w / sub_w.sum(-1, keepdim=True)
    masked = logits.masked_fill(~mask, float("-inf"))
    nr_w, nr_i = torch.softmax(masked, -1).topk(k, -1)
    return {
        "no_renorm_after_mask": (w, i),
        "renorm_after_mask": (w / w.sum(-1, keepdim=True), i),
        "local_ids": (sub_w, sub_i),
        "no_renorm": (nr_w, nr_i),
    }


_ROUTER_HINTS = {
    "no_renorm_after_mask": "you took the softmax over all experts and then dropped the removed ones: mask the "
                            "removed experts' LOGITS to -inf BEFORE the softmax, then top-k and renormalise",
    "renorm_after_mask": "your indices are right but the weights come from a softmax over all experts; mask the logits "
                         "to -inf before the softmax (the kept experts then share the whole probability mass)",
    "local_ids": "your indices are positions in the kept list (0..len(kept)-1): return the ORIGINAL expert ids "
                 "(e.g. kept[j]), as the router of the unpruned layer would",
    "no_renorm": "the top-k weights must be renormalised to sum to 1 over the k chosen experts",
}


@checker("Exercise 4.2: router restricted to the kept experts")
def check_restrict_router(restrict_router_fn) -> None:
    hand = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]])
    cases = [(hand, [0, 2, 3], 2), (hand, [1, 2], 1), (torch.randn(32, 8) * 2, [0, 2, 3, 5, 6, 7], 2),
             (torch.randn(16, 8), [1, 4, 6, 7], 2), (torch.randn(10, 6), [0, 1, 2, 3, 4, 5], 2),
             (torch.randn(12, 8), [2, 3, 5], 3)]
    for logits, kept, k in cases:
        desc = f"(logits of shape {tuple(logits.shape)}, kept={kept}, k={k})"
        out = restrict_router_fn(logits.clone(), list(kept), k)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
            raise CheckFailed(f"return a pair (weights [T, k], indices [T, k]) of tensors {desc}")
        w, i = out
        expect(w.shape == (logits.shape[0], k) and i.shape == (logits.shape[0], k),
               f"weights and indices must have shape [T, k] = [{logits.shape[0]}, {k}], got "
               f"{tuple(w.shape)} and {tuple(i.shape)} {desc}")
        ref_w, ref_i = restrict_router(logits, kept, k)
        if torch.equal(i.long(), ref_i) and torch.allclose(w.float(), ref_w, atol=1e-5):
            continue
        for name, (vw, vi) in _router_variants(logits, kept, k).items():
            if torch.equal(i.long(), vi) and torch.allclose(w.float(), vw, atol=1e-5):
                raise CheckFailed(f"{_ROUTER_HINTS[name]} {desc}")
        if not set(i.reshape(-1).tolist()) <= set(kept):
            raise CheckFailed(f"a removed expert was chosen: only experts in kept={kept} may be routed to {desc}")
        if torch.equal(i.long().sort(-1).values, ref_i.sort(-1).values):
            raise CheckFailed(f"the right experts, but order them by decreasing weight (as topk does) {desc}")
        raise CheckFailed(f"weights/indices differ from the reference (first row: {ref_w[0].tolist()}, "
                          f"{ref_i[0].tolist()}) {desc}")
