"""Chapter 2: expert-choice routing, the Switch loss over a padded batch, batch prioritized routing, expert
capacity, drop rates of a real model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch02")


# ------------------------------------------------------------------ 2.1 expert_choice_route
@M.right("check_expert_choice_route")
def expert_choice_loop(logits, capacity):
    """One topk per expert column, stacked; tokens sorted within each row."""
    probs = F.softmax(logits, dim=1)
    ws, ts = [], []
    for i in range(logits.shape[1]):
        w, t = probs[:, i].topk(capacity)
        order = t.argsort()
        ws.append(w[order])
        ts.append(t[order])
    return torch.stack(ws), torch.stack(ts)


@M.wrong("check_expert_choice_route", "token choice")
def expert_choice_token_choice(logits, capacity):
    """Each token picks `capacity` experts (the chapter's token choice)."""
    return torch.softmax(logits, dim=-1).topk(capacity, dim=-1)


@M.wrong("check_expert_choice_route", "over the tokens")
def expert_choice_softmax_tokens(logits, capacity):
    """Softmax over dim=0 (the tokens)."""
    return torch.softmax(logits, dim=0).t().topk(capacity, dim=-1)


@M.wrong("check_expert_choice_route", "raw logit")
def expert_choice_ranked_by_logits(logits, capacity):
    """Tokens ranked by the raw logit; weights are the probabilities of those tokens."""
    tokens = logits.t().topk(capacity, dim=-1).indices
    return torch.softmax(logits, dim=-1).t().gather(1, tokens), tokens


@M.wrong("check_expert_choice_route", "inf/nan")
def expert_choice_naive_softmax(logits, capacity):
    """A hand-written softmax, exp(z) / sum exp(z), that overflows for large logits."""
    e = torch.exp(logits)
    return (e / e.sum(-1, keepdim=True)).t().topk(capacity, dim=-1)


@M.wrong("check_expert_choice_route", "renormalised")
def expert_choice_renormalised(logits, capacity):
    """Each expert's C weights divided by their sum."""
    w, t = torch.softmax(logits, dim=-1).t().topk(capacity, dim=-1)
    return w / w.sum(-1, keepdim=True), t


@M.wrong("check_expert_choice_route", "raw logits")
def expert_choice_logit_weights(logits, capacity):
    """Right tokens, the logits as weights."""
    tokens = torch.softmax(logits, dim=-1).t().topk(capacity, dim=-1).indices
    return logits.t().gather(1, tokens), tokens


@M.wrong("check_expert_choice_route", "transposed")
def expert_choice_transposed(logits, capacity):
    """Returned [C, N]."""
    w, t = torch.softmax(logits, dim=-1).t().topk(capacity, dim=-1)
    return w.t(), t.t()


@M.wrong("check_expert_choice_route", "gradient")
def expert_choice_detached(logits, capacity):
    """Weights detached."""
    w, t = torch.softmax(logits.detach(), dim=-1).t().topk(capacity, dim=-1)
    return w, t


@M.wrong("check_expert_choice_route", "smallest")
def expert_choice_smallest(logits, capacity):
    """largest=False."""
    return torch.softmax(logits, dim=-1).t().topk(capacity, dim=-1, largest=False)


# ------------------------------------------------------------------ 2.2 masked_balance_loss
def _switch(probs, indices, n):
    f = torch.bincount(indices.reshape(-1), minlength=n).to(probs.dtype) / indices.numel()
    return n * (f * probs.reshape(-1, n).mean(0)).sum()


@M.right("check_masked_balance_loss")
def masked_weighted_sums(probs, indices, attention_mask, num_experts):
    """Weighted sums with the mask as 0/1 weights (no boolean indexing)."""
    m = attention_mask.to(probs.dtype)
    r = m.sum()
    f = (F.one_hot(indices, num_experts).to(probs.dtype) * m[..., None, None]).sum((0, 1, 2)) / (r * indices.shape[-1])
    p = (probs * m[..., None]).sum((0, 1)) / r
    return num_experts * (f * p).sum()


@M.wrong("check_masked_balance_loss", "padding tokens count")
def masked_ignored(probs, indices, attention_mask, num_experts):
    """The mask ignored."""
    return _switch(probs, indices, num_experts)


@M.wrong("check_masked_balance_loss", "p_i still averages")
def masked_f_only(probs, indices, attention_mask, num_experts):
    """f over the real tokens, P over all positions."""
    real = attention_mask.bool()
    f = torch.bincount(indices[real].reshape(-1), minlength=num_experts).to(probs.dtype) / indices[real].numel()
    return num_experts * (f * probs.reshape(-1, num_experts).mean(0)).sum()


@M.wrong("check_masked_balance_loss", "f still counts")
def masked_p_only(probs, indices, attention_mask, num_experts):
    """P over the real tokens, f over all positions."""
    real = attention_mask.bool()
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()
    return num_experts * (f * probs[real].mean(0)).sum()


@M.wrong("check_masked_balance_loss", "still divided by all")
def masked_zeroed_not_renormalised(probs, indices, attention_mask, num_experts):
    """Padding zeroed, but divided by all B*S positions."""
    m = attention_mask.to(probs.dtype)
    f = (F.one_hot(indices, num_experts).to(probs.dtype) * m[..., None, None]).sum((0, 1, 2)) / indices.numel()
    p = (probs * m[..., None]).sum((0, 1)) / m.numel()
    return num_experts * (f * p).sum()


@M.wrong("check_masked_balance_loss", "padding tokens:")
def masked_inverted(probs, indices, attention_mask, num_experts):
    """The padding positions used instead of the real ones."""
    pad = ~attention_mask.bool()
    if not pad.any():
        return _switch(probs, indices, num_experts)
    return _switch(probs[pad], indices[pad], num_experts)


@M.wrong("check_masked_balance_loss", "full softmax")
def masked_p_over_kept(probs, indices, attention_mask, num_experts):
    """P_i from the probabilities of the chosen experts only (zero elsewhere)."""
    real = attention_mask.bool()
    p, ix = probs[real], indices[real]
    kept = p * F.one_hot(ix, num_experts).sum(1).clamp(max=1)
    f = torch.bincount(ix.reshape(-1), minlength=num_experts).to(p.dtype) / ix.numel()
    return num_experts * (f * kept.mean(0)).sum()


@M.wrong("check_masked_balance_loss", "n factor")
def masked_no_n(probs, indices, attention_mask, num_experts):
    """sum f P without N."""
    real = attention_mask.bool()
    return _switch(probs[real], indices[real], num_experts) / num_experts


@M.wrong("check_masked_balance_loss", "count")
def masked_soft_f(probs, indices, attention_mask, num_experts):
    """f taken as the mean probability."""
    p = probs[attention_mask.bool()].mean(0)
    return num_experts * (p * p).sum()


@M.wrong("check_masked_balance_loss", "load_balancing_loss")
def masked_calls_package(probs, indices, attention_mask, num_experts):
    """Right numbers, but through the package's load_balancing_loss (the exercise forbids it)."""
    from moe_course.losses import load_balancing_loss
    real = attention_mask.bool()
    return load_balancing_loss(probs[real], indices[real], num_experts)


# ------------------------------------------------------------------ 2.3 priority_keep_mask
def _positions(queue, num_experts):
    return (F.one_hot(queue, num_experts).cumsum(dim=0) - 1).gather(1, queue[:, None]).squeeze(1)


def _cm(indices, n, capacity):
    T, k = indices.shape
    return (_positions(indices.t().reshape(-1), n) < capacity).view(k, T).t()


def _bpr(indices, weights, n, capacity, descending=True, unpermute=True, inner=_cm):
    order = torch.argsort(weights.max(1).values, descending=descending, stable=True)
    kept = inner(indices[order], n, capacity)
    if not unpermute:
        return kept
    keep = torch.empty_like(kept)
    keep[order] = kept
    return keep


@M.right("check_priority_keep_mask")
def priority_loop(indices, weights, num_experts, capacity):
    """Python loops: tokens sorted with sorted() by (-priority, position), counters per expert."""
    T, k = indices.shape
    prio = weights.max(1).values.tolist()
    order = sorted(range(T), key=lambda t: (-prio[t], t))
    used = [0] * num_experts
    keep = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in order:
            e = int(indices[t, j])
            keep[t, j] = used[e] < capacity
            used[e] += 1
    return keep


@M.wrong("check_priority_keep_mask", "ignored the weights")
def priority_none(indices, weights, num_experts, capacity):
    """The chapter's choice-major mask, weights ignored."""
    return _cm(indices, num_experts, capacity)


@M.wrong("check_priority_keep_mask", "least confident")
def priority_ascending(indices, weights, num_experts, capacity):
    """Sorted ascending."""
    return _bpr(indices, weights, num_experts, capacity, descending=False)


@M.wrong("check_priority_keep_mask", "put each sorted row back")
def priority_not_unsorted(indices, weights, num_experts, capacity):
    """Returned in priority order."""
    return _bpr(indices, weights, num_experts, capacity, unpermute=False)


@M.wrong("check_priority_keep_mask", "not token by token")
def priority_token_major(indices, weights, num_experts, capacity):
    """Token-major queue within the priority order."""
    def token_major(ix, n, c):
        return (_positions(ix.reshape(-1), n) < c).view(ix.shape)
    return _bpr(indices, weights, num_experts, capacity, inner=token_major)


@M.wrong("check_priority_keep_mask", "belongs to the token")
def priority_per_assignment(indices, weights, num_experts, capacity):
    """Every assignment sorted by its own weight."""
    T, k = indices.shape
    queue, w = indices.t().reshape(-1), weights.t().reshape(-1)
    order = torch.argsort(w, descending=True, stable=True)
    pos = torch.empty_like(queue)
    pos[order] = _positions(queue[order], num_experts)
    return (pos < capacity).view(k, T).t()


@M.wrong("check_priority_keep_mask", "too many")
def priority_off_by_one(indices, weights, num_experts, capacity):
    """position <= capacity."""
    return _bpr(indices, weights, num_experts, capacity + 1)


@M.wrong("check_priority_keep_mask", "capacity_mask")
def priority_calls_package(indices, weights, num_experts, capacity):
    """Right idea, but the package's capacity_mask does the queueing (the exercise forbids it)."""
    from moe_course.dispatch import capacity_mask
    return _bpr(indices, weights, num_experts, capacity, inner=capacity_mask)


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


# ------------------------------------------------------------------ 2.5 dropped_fraction (use it)
def _batches(indices, weights, batch_tokens):
    for start in range(0, len(indices), batch_tokens):
        yield indices[start:start + batch_tokens], weights[start:start + batch_tokens]


def _drop(indices, weights, n, cf, bt, mask=_bpr, cap_tokens=None):
    """(dropped assignments fraction, fraction of tokens with none kept)."""
    k = indices.shape[1]
    dropped = skipped = 0
    for ix, w in _batches(indices, weights, bt):
        keep = mask(ix, w, n, math.ceil(cf * (cap_tokens or len(ix)) * k / n))
        dropped += int((~keep).sum())
        skipped += int((~keep.any(1)).sum())
    return dropped / indices.numel(), skipped / len(indices)


@M.right("check_dropped_fraction")
def dropped_counted_kept(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """1 - kept / all, with torch.split; skipped tokens as those whose row sum is 0; tensors returned."""
    k = indices.shape[1]
    kept = skipped = 0
    for ix, w in zip(indices.split(batch_tokens), weights.split(batch_tokens)):
        cap = -(-int(capacity_factor * len(ix) * k * 4) // (num_experts * 4))
        keep = _bpr(ix, w, num_experts, cap)
        kept += int(keep.sum())
        skipped += int((keep.sum(1) == 0).sum())
    return torch.tensor(1.0 - kept / indices.numel()), torch.tensor(skipped / len(indices))


@M.wrong("check_dropped_fraction", "kept fraction")
def dropped_returns_kept(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """Returns the kept fraction of assignments first."""
    d, s = _drop(indices, weights, num_experts, capacity_factor, batch_tokens)
    return 1 - d, s


@M.wrong("check_dropped_fraction", "percentages")
def dropped_percent(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """Returns percentages."""
    d, s = _drop(indices, weights, num_experts, capacity_factor, batch_tokens)
    return 100 * d, 100 * s


@M.wrong("check_dropped_fraction", "number of tokens")
def dropped_per_token(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """Dropped assignments divided by the number of tokens."""
    d, s = _drop(indices, weights, num_experts, capacity_factor, batch_tokens)
    return d * indices.shape[1], s


@M.wrong("check_dropped_fraction", "its own number of tokens")
def dropped_full_capacity_for_last(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """Every batch, the last shorter one too, gets the capacity of a full batch."""
    return _drop(indices, weights, num_experts, capacity_factor, batch_tokens, cap_tokens=batch_tokens)


@M.wrong("check_dropped_fraction", "consecutive batches")
def dropped_one_batch(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """All tokens as a single batch."""
    return _drop(indices, weights, num_experts, capacity_factor, len(indices))


@M.wrong("check_dropped_fraction", "all its k assignments")
def dropped_any(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """A token counted as skipped when any one of its assignments is dropped."""
    d, _ = _drop(indices, weights, num_experts, capacity_factor, batch_tokens)
    _, s = _drop(indices, weights, num_experts, capacity_factor, batch_tokens,
                 mask=lambda i, w, n, c: _bpr(i, w, n, c).all(1, keepdim=True).expand_as(i))
    return d, s


@M.wrong("check_dropped_fraction", "choice-major")
def dropped_choice_major(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """The chapter's choice-major mask instead of priority_keep_mask."""
    return _drop(indices, weights, num_experts, capacity_factor, batch_tokens, mask=lambda i, w, n, c: _cm(i, n, c))


@M.wrong("check_dropped_fraction", "capacity_mask")
def dropped_package_mask(indices, weights, num_experts, capacity_factor, batch_tokens=2560):
    """Uses the package's capacity_mask (forbidden)."""
    from moe_course.dispatch import capacity_mask
    return _drop(indices, weights, num_experts, capacity_factor, batch_tokens,
                 mask=lambda i, w, n, c: capacity_mask(i, n, c))
