"""Chapter 9: residual similarity, best contiguous run of blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch09")


# ------------------------------------------------------------------ 9.1 residual_similarity
@M.right("check_residual_similarity")
def similarity_by_hand(h, out):
    """Dot products over norms, returned as a 0-d tensor."""
    new = h + out
    cos = (h * new).sum(-1) / (h.norm(dim=-1) * new.norm(dim=-1)).clamp_min(1e-8)
    return cos.mean()


@M.wrong("check_residual_similarity", "output")
def similarity_without_residual(h, out):
    """cos(h, out)."""
    return F.cosine_similarity(h, out, dim=-1).mean().item()


@M.wrong("check_residual_similarity", "token dimension")
def similarity_over_tokens(h, out):
    """Cosine along dim=0."""
    return F.cosine_similarity(h, h + out, dim=0).mean().item()


@M.wrong("check_residual_similarity", "flattened")
def similarity_flattened(h, out):
    """One cosine of the flattened matrices."""
    return F.cosine_similarity(h.reshape(1, -1), (h + out).reshape(1, -1), dim=-1).item()


@M.wrong("check_residual_similarity", "mean")
def similarity_per_token(h, out):
    """No mean over tokens."""
    return F.cosine_similarity(h, h + out, dim=-1)


@M.wrong("check_residual_similarity", "distance")
def similarity_as_distance(h, out):
    """1 - cos (a distance)."""
    return 1 - F.cosine_similarity(h, h + out, dim=-1).mean().item()


@M.wrong("check_residual_similarity", "h + out")
def similarity_with_difference(h, out):
    """cos(h, h - out)."""
    return F.cosine_similarity(h, h - out, dim=-1).mean().item()


# ------------------------------------------------------------------ 9.2 best_contiguous_run
def _sims(hidden, n, offset=0):
    L = len(hidden) - 1
    return [F.cosine_similarity(hidden[b], hidden[b + n + offset], dim=-1).mean().item() for b in range(L - n + 1)]


@M.right("check_best_contiguous_run")
def run_argmax_tensor(hidden, n):
    """Stack the states, one batched cosine, torch.argmax (first maximum)."""
    h = torch.stack(hidden)
    sims = F.cosine_similarity(h[:-n], h[n:], dim=-1).mean(-1)
    return int(torch.argmax(sims))


@M.wrong("check_best_contiguous_run", "off by one")
def run_off_by_one(hidden, n):
    """Compares hidden[b] with hidden[b + n - 1]."""
    L = len(hidden) - 1
    sims = [F.cosine_similarity(hidden[b], hidden[b + n - 1], dim=-1).mean().item() for b in range(L - n + 2)]
    return max(range(len(sims)), key=sims.__getitem__)


@M.wrong("check_best_contiguous_run", "lowest")
def run_argmin(hidden, n):
    """The least similar run."""
    sims = _sims(hidden, n)
    return min(range(len(sims)), key=sims.__getitem__)


@M.wrong("check_best_contiguous_run", "only the start")
def run_returns_pair(hidden, n):
    """(b, similarity), like the package function."""
    sims = _sims(hidden, n)
    b = max(range(len(sims)), key=sims.__getitem__)
    return b, sims[b]


@M.wrong("check_best_contiguous_run", "endpoints")
def run_sum_of_steps(hidden, n):
    """Scores a run by the similarity of each block's input and output, summed over the run."""
    steps = _sims(hidden, 1)
    scores = [sum(steps[b:b + n]) for b in range(len(hidden) - n)]
    return max(range(len(scores)), key=scores.__getitem__)


@M.wrong("check_best_contiguous_run", "endpoints")
def run_weakest_step(hidden, n):
    """Scores a run by its least similar single block."""
    steps = _sims(hidden, 1)
    scores = [min(steps[b:b + n]) for b in range(len(hidden) - n)]
    return max(range(len(scores)), key=scores.__getitem__)


@M.wrong("check_best_contiguous_run", "earliest")
def run_last_on_ties(hidden, n):
    """>= in the loop: the LAST of equally good runs."""
    sims = _sims(hidden, n)
    best = 0
    for b in range(len(sims)):
        if sims[b] >= sims[best]:
            best = b
    return best


@M.wrong("check_best_contiguous_run", "l - n")
def run_misses_last_start(hidden, n):
    """range(L - n): the last possible start is never tried."""
    L = len(hidden) - 1
    sims = [F.cosine_similarity(hidden[b], hidden[b + n], dim=-1).mean().item() for b in range(L - n)]
    return max(range(len(sims)), key=sims.__getitem__)
