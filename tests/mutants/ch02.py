"""Chapter 2: top-k routing, Switch balance loss, capacity mask, expert capacity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch02")


# ------------------------------------------------------------------ 2.1 topk_route
@M.right("check_topk_route")
def topk_route_kept_logits(logits, k):
    """Shazeer's form: softmax over the k kept logits."""
    top, indices = logits.topk(k, dim=-1)
    return torch.softmax(top, dim=-1), indices


@M.right("check_topk_route")
def topk_route_sorted_by_expert(logits, k):
    """The k choices returned in expert-id order (any order is accepted)."""
    probs = F.softmax(logits, dim=1)
    idx = probs.topk(k, dim=1).indices.sort(dim=1).values
    w = probs.gather(1, idx)
    return w / w.sum(1, keepdim=True), idx


@M.wrong("check_topk_route", "not renormalised")
def not_renormalised(logits, k):
    """The top-k probabilities as they are."""
    return torch.softmax(logits, dim=-1).topk(k, dim=-1)


@M.wrong("check_topk_route", "wrong axis")
def softmax_over_tokens(logits, k):
    """softmax over dim=0."""
    w, i = torch.softmax(logits, dim=0).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_topk_route", "smallest")
def k_smallest(logits, k):
    """largest=False."""
    w, i = torch.softmax(logits, dim=-1).topk(k, dim=-1, largest=False)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_topk_route", "gradient")
def detached_weights(logits, k):
    """The weights are detached."""
    w, i = torch.softmax(logits.detach(), dim=-1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_topk_route", "inf/nan")
def unstable_exp(logits, k):
    """exp / sum exp without subtracting the max."""
    e = logits.exp()
    w, i = (e / e.sum(-1, keepdim=True)).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


@M.wrong("check_topk_route", "renormalised probabilities")
def softmax_of_probabilities(logits, k):
    """A second softmax over the kept probabilities (instead of dividing by their sum)."""
    w, i = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return torch.softmax(w, dim=-1), i


@M.wrong("check_topk_route", "integers")
def float_indices(logits, k):
    """Indices as floats."""
    w, i = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), i.float()


@M.wrong("check_topk_route", "expert axis")
def topk_over_tokens(logits, k):
    """topk along dim=0."""
    w, i = torch.softmax(logits, dim=-1).topk(k, dim=0)
    return w / w.sum(0, keepdim=True), i


# ------------------------------------------------------------------ 2.2 switch_balance_loss
@M.right("check_switch_balance_loss")
def balance_one_hot(probs, indices, num_experts):
    """f from a one-hot of the indices averaged over all T*k assignments."""
    f = F.one_hot(indices, num_experts).float().mean(dim=(0, 1))
    return num_experts * torch.dot(f.to(probs.dtype), probs.mean(0))


@M.wrong("check_switch_balance_loss", "count")
def f_from_soft_probs(probs, indices, num_experts):
    """f_i taken as the mean probability (N sum P_i^2)."""
    p = probs.mean(dim=0)
    return num_experts * (p * p).sum()


@M.wrong("check_switch_balance_loss", "n factor")
def forgot_n(probs, indices, num_experts):
    """sum f_i P_i without N."""
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return (f * probs.mean(0)).sum()


@M.wrong("check_switch_balance_loss", "instead of t*k")
def f_per_token(probs, indices, num_experts):
    """f divided by T instead of T*k."""
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.shape[0]
    return num_experts * (f * probs.mean(0)).sum()


@M.wrong("check_switch_balance_loss", "full softmax")
def p_from_renormalised_topk(probs, indices, num_experts):
    """P from the renormalised top-k weights."""
    w = probs.gather(1, indices)
    w = w / w.sum(-1, keepdim=True)
    p = torch.zeros_like(probs).scatter(1, indices, w).mean(0)
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (f * p).sum()


@M.wrong("check_switch_balance_loss", "gradient")
def detached_probs(probs, indices, num_experts):
    """P computed from probs.detach()."""
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (f * probs.detach().mean(0)).sum()


@M.wrong("check_switch_balance_loss", "indices")
def indices_recomputed(probs, indices, num_experts):
    """Ignores `indices` and re-derives the routing from probs (top-k of the probabilities)."""
    own = probs.topk(indices.shape[1], dim=-1).indices
    f = torch.bincount(own.reshape(-1), minlength=num_experts).to(probs.dtype) / own.numel()
    return num_experts * (f * probs.mean(0)).sum()


@M.wrong("check_switch_balance_loss", "minlength")
def bincount_without_minlength(probs, indices, num_experts):
    """torch.bincount without minlength (broadcasts when only expert 0 is used)."""
    f = torch.bincount(indices.reshape(-1)).to(probs.dtype) / indices.numel()
    return num_experts * (f * probs.mean(0)).sum()


@M.wrong("check_switch_balance_loss", "p_i")
def p_of_routed_tokens_only(probs, indices, num_experts):
    """P_i averaged only over the tokens routed to expert i."""
    chosen = F.one_hot(indices, num_experts).sum(1).clamp(max=1).to(probs.dtype)  # [T, N]
    p = (probs * chosen).sum(0) / chosen.sum(0).clamp(min=1)
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (f * p).sum()


# ------------------------------------------------------------------ 2.3 capacity_keep_mask
def _positions(queue, num_experts):
    return (F.one_hot(queue, num_experts).cumsum(dim=0) - 1).gather(1, queue[:, None]).squeeze(1)


@M.right("check_capacity_keep_mask")
def capacity_loop(indices, num_experts, capacity):
    """A loop over choices, then tokens, with a counter per expert."""
    T, k = indices.shape
    used = [0] * num_experts
    keep = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(indices[t, j])
            if used[e] < capacity:
                keep[t, j] = True
            used[e] += 1
    return keep


@M.wrong("check_capacity_keep_mask", "token order")
def token_major(indices, num_experts, capacity):
    """Token-major priority (token 0's choices, then token 1's ...)."""
    pos = _positions(indices.reshape(-1), num_experts)
    return (pos < capacity).view(indices.shape)


@M.wrong("check_capacity_keep_mask", "off by one")
def inclusive_capacity(indices, num_experts, capacity):
    """position <= capacity."""
    T, k = indices.shape
    pos = _positions(indices.t().reshape(-1), num_experts)
    return (pos <= capacity).view(k, T).t()


@M.wrong("check_capacity_keep_mask", "one assignment too few")
def one_based_positions(indices, num_experts, capacity):
    """1-based queue positions compared with <."""
    T, k = indices.shape
    queue = indices.t().reshape(-1)
    pos = F.one_hot(queue, num_experts).cumsum(0).gather(1, queue[:, None]).squeeze(1)
    return (pos < capacity).view(k, T).t()


@M.wrong("check_capacity_keep_mask", "bool")
def int_mask(indices, num_experts, capacity):
    """A 0/1 integer mask."""
    T, k = indices.shape
    pos = _positions(indices.t().reshape(-1), num_experts)
    return (pos < capacity).long().view(k, T).t()


@M.wrong("check_capacity_keep_mask", "capacity is")
def capacity_per_choice(indices, num_experts, capacity):
    """A separate queue per choice column (each expert gets `capacity` slots per column)."""
    cols = [(_positions(indices[:, j], num_experts) < capacity) for j in range(indices.shape[1])]
    return torch.stack(cols, dim=1)


@M.wrong("check_capacity_keep_mask", "choice-major")
def wrong_unflatten(indices, num_experts, capacity):
    """Queued choice-major but reshaped back with .view(T, k) (no transpose)."""
    T, k = indices.shape
    pos = _positions(indices.t().reshape(-1), num_experts)
    return (pos < capacity).reshape(T, k)


# ------------------------------------------------------------------ 2.4 expert_capacity
@M.right("check_expert_capacity")
def capacity_negated_floor(num_tokens, num_experts, k, capacity_factor):
    """Ceiling as the negated floor of the negation."""
    return int(-(-(capacity_factor * num_tokens * k) // num_experts))


@M.right("check_expert_capacity")
def capacity_other_order(num_tokens, num_experts, k, capacity_factor):
    """The same formula with the factors in another order."""
    return math.ceil(num_tokens * k / num_experts * capacity_factor)


@M.wrong("check_expert_capacity", "floor")
def capacity_floor(num_tokens, num_experts, k, capacity_factor):
    """Rounded down."""
    return math.floor(capacity_factor * num_tokens * k / num_experts)


@M.wrong("check_expert_capacity", "round")
def capacity_round(num_tokens, num_experts, k, capacity_factor):
    """Rounded to the nearest integer."""
    return round(capacity_factor * num_tokens * k / num_experts)


@M.wrong("check_expert_capacity", "k is missing")
def capacity_without_k(num_tokens, num_experts, k, capacity_factor):
    """k forgotten: T / N slots per expert."""
    return math.ceil(capacity_factor * num_tokens / num_experts)


@M.wrong("check_expert_capacity", "floor")
def capacity_integer_division(num_tokens, num_experts, k, capacity_factor):
    """Integer division of the product."""
    return int(capacity_factor * num_tokens * k) // num_experts


@M.wrong("check_expert_capacity", "exactly")
def capacity_int_plus_one(num_tokens, num_experts, k, capacity_factor):
    """int(x) + 1 as a 'ceiling' (one too many when x is a whole number)."""
    return int(capacity_factor * num_tokens * k / num_experts) + 1


@M.wrong("check_expert_capacity", "capacity_factor")
def capacity_without_factor(num_tokens, num_experts, k, capacity_factor):
    """The capacity factor forgotten."""
    return math.ceil(num_tokens * k / num_experts)


@M.wrong("check_expert_capacity", "round up once")
def capacity_ceil_before_k(num_tokens, num_experts, k, capacity_factor):
    """Rounded up per choice, then multiplied by k."""
    return k * math.ceil(capacity_factor * num_tokens / num_experts)


@M.wrong("check_expert_capacity", "int")
def capacity_float(num_tokens, num_experts, k, capacity_factor):
    """A float (numpy-style ceil)."""
    return float(math.ceil(capacity_factor * num_tokens * k / num_experts))
