"""Checkers for chapter 8, merging experts: neuron matching and frequency-weighted merging.

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.merging.match_neurons` and
:func:`~moe_course.compress.merging.frequency_weighted_merge`) on planted, random and edge cases,
and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moe_course.compress.merging import frequency_weighted_merge, match_neurons

from .core import CheckFailed, checker, expect

__all__ = ["check_match_neurons", "check_frequency_weighted_merge"]


# --------------------------------------------------------------------------------------------
# Exercise 8.1: weight matching of hidden neurons
# --------------------------------------------------------------------------------------------
def _lap(c: torch.Tensor, maximize: bool) -> torch.Tensor:
    rows, cols = linear_sum_assignment(c.double().numpy(), maximize=maximize)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def _cases():
    g = torch.Generator().manual_seed(8)
    out = []
    for d, h, noise_in, noise_out in ((6, 5, 0.0, 0.0), (8, 12, 0.3, 0.3), (10, 16, 2.0, 0.2), (4, 20, 1.5, 0.1)):
        ref_in, ref_out = torch.randn(d, h, generator=g), torch.randn(h, d, generator=g)
        p = torch.randperm(h, generator=g)
        w_in = ref_in[:, p] + noise_in * torch.randn(d, h, generator=g)       # a permuted, perturbed copy
        w_out = ref_out[p] + noise_out * torch.randn(h, d, generator=g)
        out.append((ref_in, ref_out, w_in, w_out))
    return out


@checker("Exercise 8.1: match neurons by weight matching")
def check_match_neurons(match_neurons_fn) -> None:
    for ref_in, ref_out, w_in, w_out in _cases():
        d, h = ref_in.shape
        desc = f"(d={d}, h={h})"
        got = match_neurons_fn(ref_in.clone(), ref_out.clone(), w_in.clone(), w_out.clone())
        got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).reshape(-1).long()
        expect(got.numel() == h and sorted(got.tolist()) == list(range(h)),
               f"return a permutation of range(h={h}) (one entry per hidden neuron) {desc}")
        ref = match_neurons(ref_in, ref_out, w_in, w_out)
        if torch.equal(got, ref):
            continue
        c = ref_in.T @ w_in + ref_out @ w_out.T
        if torch.equal(got, _lap(c, maximize=False)):
            raise CheckFailed(f"you minimised the similarity: linear_sum_assignment(C, maximize=True) pairs the MOST "
                              f"similar neurons {desc}")
        if torch.equal(got, _lap(ref_in.T @ w_in, maximize=True)):
            raise CheckFailed(f"you matched with the input weights only: add ref_out @ w_out.T to the cost, both "
                              f"layers of the expert carry the neuron's identity {desc}")
        if torch.equal(got, _lap(ref_out @ w_out.T, maximize=True)):
            raise CheckFailed(f"you matched with the output weights only: add ref_in.T @ w_in to the cost {desc}")
        if torch.equal(got, torch.argsort(ref)):
            raise CheckFailed(f"you returned the inverse permutation: w_in[:, perm] must line up with ref_in "
                              f"(perm[a] = the neuron of w that matches reference neuron a) {desc}")
        raise CheckFailed(f"the permutation does not maximise the matched similarity "
                          f"sum_a C[a, perm[a]] with C = ref_in.T @ w_in + ref_out @ w_out.T {desc}")


# --------------------------------------------------------------------------------------------
# Exercise 8.2: frequency-weighted merge
# --------------------------------------------------------------------------------------------
@checker("Exercise 8.2: frequency-weighted merge")
def check_frequency_weighted_merge(merge_fn) -> None:
    g = torch.Generator().manual_seed(80)
    cases = [(torch.stack([torch.ones(2, 3), 3 * torch.ones(2, 3)]), torch.tensor([1.0, 3.0])),
             (torch.randn(4, 5, 6, generator=g), torch.tensor([0.4, 0.1, 0.3, 0.2])),
             (torch.randn(3, 7, generator=g), torch.tensor([5.0, 1.0, 2.0])),          # counts, not fractions
             (torch.randn(2, 4, 4, generator=g), torch.tensor([0.05, 0.01]))]           # a group's share of tokens
    for w, f in cases:
        desc = f"(weights of shape {tuple(w.shape)}, freqs={f.tolist()})"
        out = merge_fn(w.clone(), f.clone())
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a tensor, got {type(out).__name__} {desc}")
        expect(out.shape == w.shape[1:], f"the merged expert must have shape {tuple(w.shape[1:])} (one expert), "
                                         f"got {tuple(out.shape)} {desc}")
        ref = frequency_weighted_merge(w, f)
        if torch.allclose(out, ref, atol=1e-5):
            continue
        if torch.allclose(out, w.mean(0), atol=1e-5):
            raise CheckFailed(f"you took the uniform average: weight each expert by its frequency f_j {desc}")
        if torch.allclose(out, torch.tensordot(f, w, dims=1), atol=1e-5):
            raise CheckFailed(f"the frequencies are not normalised: divide by sum_j f_j inside the group "
                              f"(the weights of a merge must sum to 1) {desc}")
        if torch.allclose(out, torch.tensordot(f, w, dims=1) / w.shape[0], atol=1e-5):
            raise CheckFailed(f"you divided by the number of experts n; divide by the total frequency sum_j f_j "
                              f"so that the merge weights f_j / sum_j f_j sum to 1 {desc}")
        if torch.allclose(out, torch.tensordot(torch.softmax(f, 0), w, dims=1), atol=1e-5):
            raise CheckFailed(f"you took a softmax of the frequencies: the merge weights are proportional to the "
                              f"frequencies themselves, f_j / sum_j f_j {desc}")
        raise CheckFailed(f"expected sum_j f_j W_j / sum_j f_j {desc}")
    w = torch.randn(3, 4, generator=g)
    out = merge_fn(w.clone(), torch.zeros(3))
    expect(torch.is_tensor(out) and torch.allclose(out, w.mean(0), atol=1e-5) and not torch.isnan(out).any(),
           "when every frequency is 0 (a group no token used), fall back to the uniform average instead of 0/0")
