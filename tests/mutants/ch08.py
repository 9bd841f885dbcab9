"""Chapter 8: matching hidden neurons, frequency-weighted merge."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import Chapter

M = Chapter("ch08")


# ------------------------------------------------------------------ 8.1 match_neurons
def _lap(c, maximize=True):
    rows, cols = linear_sum_assignment(c.detach().double().numpy(), maximize=maximize)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


@M.right("check_match_neurons")
def match_minimise_negated(ref_in, ref_out, w_in, w_out):
    """Minimise -C with einsum-built similarities; returns a numpy array."""
    c = torch.einsum("da,db->ab", ref_in, w_in) + torch.einsum("ad,bd->ab", ref_out, w_out)
    rows, cols = linear_sum_assignment(-c.double().numpy())
    return cols


@M.wrong("check_match_neurons", "minimised")
def match_minimise(ref_in, ref_out, w_in, w_out):
    """linear_sum_assignment without maximize=True."""
    return _lap(ref_in.T @ w_in + ref_out @ w_out.T, maximize=False)


@M.wrong("check_match_neurons", "input weights only")
def match_inputs_only(ref_in, ref_out, w_in, w_out):
    """Only W_in."""
    return _lap(ref_in.T @ w_in)


@M.wrong("check_match_neurons", "output weights only")
def match_outputs_only(ref_in, ref_out, w_in, w_out):
    """Only W_out."""
    return _lap(ref_out @ w_out.T)


@M.wrong("check_match_neurons", "inverse permutation")
def match_transposed_cost(ref_in, ref_out, w_in, w_out):
    """C transposed: rows are w's neurons (the inverse permutation)."""
    return _lap((ref_in.T @ w_in + ref_out @ w_out.T).T)


@M.wrong("check_match_neurons", "permutation of range")
def match_greedy_argmax(ref_in, ref_out, w_in, w_out):
    """Row-wise argmax (not a permutation: two reference neurons may pick the same one)."""
    return (ref_in.T @ w_in + ref_out @ w_out.T).argmax(dim=1)


@M.wrong("check_match_neurons", "does not maximise")
def match_greedy_sequential(ref_in, ref_out, w_in, w_out):
    """Greedy: each reference neuron in turn takes its best remaining partner."""
    c = (ref_in.T @ w_in + ref_out @ w_out.T).clone()
    perm = []
    for a in range(c.shape[0]):
        b = int(c[a].argmax())
        perm.append(b)
        c[:, b] = float("-inf")
    return torch.tensor(perm)


@M.wrong("check_match_neurons", "does not maximise")
def match_output_term_transposed(ref_in, ref_out, w_in, w_out):
    """The output term transposed (w_out @ ref_out.T): rows and columns of that term swapped."""
    return _lap(ref_in.T @ w_in + w_out @ ref_out.T)


# ------------------------------------------------------------------ 8.2 frequency_weighted_merge
@M.right("check_frequency_weighted_merge")
def merge_broadcast(weights, freqs):
    """Broadcast multiply and sum, all-zero case via torch.where."""
    f = freqs.float()
    total = f.sum()
    f = torch.where(total > 0, f / total.clamp_min(1e-30), torch.full_like(f, 1 / f.numel()))
    return (f.view(-1, *([1] * (weights.dim() - 1))) * weights).sum(0)


@M.wrong("check_frequency_weighted_merge", "uniform average")
def merge_uniform(weights, freqs):
    """Plain mean."""
    return weights.mean(0)


@M.wrong("check_frequency_weighted_merge", "not normalised")
def merge_unnormalised(weights, freqs):
    """sum f_j W_j without dividing by sum f_j."""
    return torch.tensordot(freqs.to(weights.dtype), weights, dims=1)


@M.wrong("check_frequency_weighted_merge", "0/0")
def merge_nan_on_zero(weights, freqs):
    """No guard: 0/0 for an unused group."""
    f = freqs.to(weights.dtype)
    return torch.tensordot(f / f.sum(), weights, dims=1)


@M.wrong("check_frequency_weighted_merge", "uniform average instead")
def merge_zero_on_zero(weights, freqs):
    """An unused group merges to zeros."""
    f = freqs.to(weights.dtype)
    if f.sum() == 0:
        return torch.zeros_like(weights[0])
    return torch.tensordot(f / f.sum(), weights, dims=1)


@M.wrong("check_frequency_weighted_merge", "number of experts")
def merge_divided_by_n(weights, freqs):
    """Divided by the number of experts n instead of sum f."""
    f = freqs.to(weights.dtype)
    return torch.tensordot(f, weights, dims=1) / weights.shape[0]


@M.wrong("check_frequency_weighted_merge", "softmax")
def merge_softmax_weights(weights, freqs):
    """softmax(freqs) as merge weights."""
    return torch.tensordot(torch.softmax(freqs.to(weights.dtype), 0), weights, dims=1)


@M.wrong("check_frequency_weighted_merge", "shape")
def merge_keeps_expert_axis(weights, freqs):
    """Weights each expert but does not sum over the group: shape [n, ...]."""
    f = freqs.to(weights.dtype)
    f = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1 / f.numel())
    return f.view(-1, *([1] * (weights.dim() - 1))) * weights
