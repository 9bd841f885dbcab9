"""Chapter 9: best contiguous run of blocks (9.1), perplexity after dropping it (9.2), global expert
drop under one budget (9.3)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_course.compress import trimming as T
from moe_course.compress.pruning import keep_experts
from moe_course.layers import Experts, moe_layers
from moe_course.train import evaluate

from . import Chapter

M = Chapter("ch09")


# ------------------------------------------------------------------ 9.1 best_contiguous_run
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



@M.wrong("check_best_contiguous_run", "package's own")
def run_by_package(hidden, n):
    """Calls the package's best_contiguous_run."""
    return T.best_contiguous_run(hidden, n)[0]


# ------------------------------------------------------------------ 9.2 run_drop_perplexity
def _best(model, calib, n, pick=max):
    hidden = T.block_hidden_states(model, calib)
    sims = _sims(hidden, n)
    return pick(range(len(sims)), key=sims.__getitem__)


def _ppl(m, val):
    return float(evaluate(m, val, batch_size=128)["perplexity"])


@M.right("check_run_drop_perplexity")
def run_drop_by_filtering(model, calib, val, n):
    """Argmax over stacked states; a new ModuleList without the run."""
    h = torch.stack(T.block_hidden_states(model, calib))
    b = int(torch.argmax(F.cosine_similarity(h[:-n], h[n:], dim=-1).mean(-1)))
    m = copy.deepcopy(model)
    m.blocks = nn.ModuleList([blk for i, blk in enumerate(m.blocks) if not b <= i < b + n])
    return torch.tensor(_ppl(m, val))


@M.wrong("check_run_drop_perplexity", "ORIGINAL")
def run_drop_forgets_to_drop(model, calib, val, n):
    """Evaluates the model without removing anything."""
    _best(model, calib, n)
    return _ppl(model, val)


@M.wrong("check_run_drop_perplexity", "LOSS")
def run_drop_returns_loss(model, calib, val, n):
    """Returns the cross-entropy (log perplexity)."""
    b = _best(model, calib, n)
    m = copy.deepcopy(model)
    del m.blocks[b:b + n]
    return math.log(_ppl(m, val))


@M.wrong("check_run_drop_perplexity", "n + 1")
def run_drop_one_too_many(model, calib, val, n):
    """del blocks[b:b + n + 1]."""
    b = _best(model, calib, n)
    m = copy.deepcopy(model)
    del m.blocks[b:b + n + 1]
    return _ppl(m, val)


@M.wrong("check_run_drop_perplexity", "LEAST alike")
def run_drop_worst_run(model, calib, val, n):
    """Drops the least similar run."""
    b = _best(model, calib, n, pick=min)
    m = copy.deepcopy(model)
    del m.blocks[b:b + n]
    return _ppl(m, val)


@M.wrong("check_run_drop_perplexity", "changed the model")
def run_drop_in_place(model, calib, val, n):
    """Deletes the blocks from the model it was given."""
    b = _best(model, calib, n)
    del model.blocks[b:b + n]
    return _ppl(model, val)


# ------------------------------------------------------------------ 9.3 global_expert_drop
def _plan(model, calib, budget, *, min_k=True, ascending=False, uniform=False, extra=0):
    scores = [(-s if ascending else s) for s in T.expert_scores(model, calib)]
    layers = moe_layers(model)
    if uniform:
        return [s.argsort(descending=True)[:budget // len(layers)].tolist() for s in scores]
    kept = [s.argsort(descending=True)[:l.k].tolist() if min_k else [] for s, l in zip(scores, layers)]
    rest = sorted(((float(s[e]), li, e) for li, s in enumerate(scores) for e in range(len(s))
                   if e not in kept[li]), reverse=True)
    for _, li, e in rest[:budget + extra - sum(len(x) for x in kept)]:
        kept[li].append(e)
    return kept


def _apply(model, kept):
    out = copy.deepcopy(model)
    for layer, ids in zip(moe_layers(out), kept):
        keep_experts(layer, sorted(ids))
    return out


def _contribution(model, calib):
    """Mean over calibration tokens of p_i(x) * ||E_i(x)||, per layer [N]."""
    from moe_course.calib import layer_inputs

    out = []
    with torch.no_grad():
        for layer, x in zip(moe_layers(model), layer_inputs(model, calib)):
            p = torch.softmax(layer.router(x).logits.float(), -1)
            y = torch.stack([layer.experts.expert_forward(i, x) for i in range(layer.num_experts)])
            out.append((p.T * y.norm(dim=-1)).mean(1))
    return out


@M.right("check_global_expert_drop")
def global_drop_masked_topk(model, calib, budget):
    """Router-weighted output norms; one topk over all scores, each layer's k best forced in."""
    scores = _contribution(model, calib)
    layers = moe_layers(model)
    s = torch.stack(scores).clone()                      # [L, N]
    forced = torch.zeros_like(s, dtype=torch.bool)
    for li, layer in enumerate(layers):
        forced[li, s[li].topk(layer.k).indices] = True
    s[forced] = float("inf")
    top = s.flatten().topk(budget).indices
    kept = [[] for _ in layers]
    for i in top.tolist():
        kept[i // s.shape[1]].append(i % s.shape[1])
    return _apply(model, kept)


@M.wrong("check_global_expert_drop", "mean router probability")
def global_drop_mean_prob(model, calib, budget):
    """The chapter's score (mean router probability), allocated globally."""
    return _apply(model, _plan(model, calib, budget))


@M.wrong("check_global_expert_drop", "uniform", "ALL layers")
def global_drop_uniform(model, calib, budget):
    """budget / L experts in every layer."""
    return _apply(model, _plan(model, calib, budget, uniform=True))


@M.wrong("check_global_expert_drop", "LOWEST")
def global_drop_ascending(model, calib, budget):
    """Ranks the scores in ascending order."""
    return _apply(model, _plan(model, calib, budget, ascending=True))


@M.wrong("check_global_expert_drop", "fewer than k")
def global_drop_no_minimum(model, calib, budget):
    """One global ranking, no k per layer guaranteed."""
    return _apply(model, _plan(model, calib, budget, min_k=False))


@M.wrong("check_global_expert_drop", "ALL layers", "not")
def global_drop_budget_on_top(model, calib, budget):
    """Keeps k per layer, then `budget` more."""
    k = moe_layers(model)[0].k
    return _apply(model, _plan(model, calib, budget, extra=k * len(moe_layers(model))))


@M.wrong("check_global_expert_drop", "router rows")
def global_drop_keeps_router(model, calib, budget):
    """Slices the expert weights but leaves the router scoring all N experts."""
    kept = _plan(model, calib, budget)
    out = copy.deepcopy(model)
    for layer, ids in zip(moe_layers(out), kept):
        old, idx = layer.experts, torch.tensor(sorted(ids))
        new = Experts(len(ids), old.d_model, old.d_hidden, old.activation)
        with torch.no_grad():
            for name in ("w_in", "w_gate", "w_out"):
                if getattr(old, name) is not None:
                    getattr(new, name).copy_(getattr(old, name)[idx])
        layer.experts = new
    return out


@M.wrong("check_global_expert_drop", "changed the model")
def global_drop_in_place(model, calib, budget):
    """keep_experts on the model it was given."""
    for layer, ids in zip(moe_layers(model), _plan(model, calib, budget)):
        keep_experts(layer, sorted(ids))
    return model


@M.wrong("check_global_expert_drop", "package's own")
def global_drop_by_package(model, calib, budget):
    """Calls drop_experts(scope="global")."""
    return T.drop_experts(model, budget, calib=calib, scope="global")
