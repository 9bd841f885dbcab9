"""Checkers for chapter 2, sparse gating: top-k routing, the Switch balance loss, the capacity mask
and the expert capacity itself.

Each checker compares the student's function with the package's reference
(:class:`moe_course.layers.TopKRouter`, :func:`moe_course.losses.load_balancing_loss`,
:func:`moe_course.dispatch.capacity_mask`, :meth:`moe_course.layers.SparseMoE.capacity`) on a
hand-made case, random cases and edge cases, and recognises the usual wrong answers so that the
hint names the mistake, not just the gap.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from moe_course.dispatch import capacity_mask
from moe_course.layers import SparseMoE
from moe_course.losses import load_balancing_loss

from .core import CheckFailed, checker, describe, expect, expect_close

__all__ = ["check_expert_choice_route", "check_masked_balance_loss", "check_priority_keep_mask", "check_expert_capacity",
           "check_dropped_fraction", "real_routing",
           "check_topk_route", "check_switch_balance_loss", "check_capacity_keep_mask"]

# The notebook says: "You may not call the package's own versions"; the checks run your function with these
# made unavailable, and a call to one of them fails the check with a hint that says so.
_NO_PACKAGE = ("moe_course.layers.TopKRouter", "moe_course.losses.load_balancing_loss",
               "moe_course.dispatch.capacity_mask", "moe_course.layers.SparseMoE.capacity")


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Exercise 2.1: top-k routing
# --------------------------------------------------------------------------------------------
def _reference_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    w, i = probs.topk(k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), i


def _by_expert(weights: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's (index, weight) pairs by expert id, so any order of the k choices is accepted."""
    order = indices.argsort(dim=-1)
    return weights.gather(-1, order), indices.gather(-1, order)


def _route_output(student_fn, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = student_fn(logits.clone(), k)
    expect(isinstance(out, (tuple, list)) and len(out) == 2,
           f"topk_route must return a pair (weights, indices), got {type(out).__name__}")
    w, i = out
    expect(torch.is_tensor(w) and torch.is_tensor(i), "both weights and indices must be torch tensors")
    t = logits.shape[0]
    expect(tuple(w.shape) == (t, k) and tuple(i.shape) == (t, k),
           f"for logits of shape {tuple(logits.shape)} and k={k}, weights and indices must both have shape "
           f"({t}, {k}); got {tuple(w.shape)} and {tuple(i.shape)}. Take the top-k along the expert axis (dim=-1)")
    expect(not i.dtype.is_floating_point, f"indices must be integers (torch.long), got {i.dtype}")
    return w, i.long()


def _diagnose_route(logits: torch.Tensor, k: int, w: torch.Tensor, i: torch.Tensor) -> None:
    ref_w, ref_i = _reference_route(logits, k)
    ws, is_ = _by_expert(w.float(), i)
    rws, ris = _by_expert(ref_w, ref_i)
    if not torch.equal(is_, ris):
        p0 = torch.softmax(logits.float(), dim=0)
        if torch.equal(_by_expert(*p0.topk(k, dim=-1))[1], is_):
            raise CheckFailed("the chosen experts come from a softmax over the wrong axis: the softmax must "
                              "run over the experts (dim=-1) so that each token's probabilities sum to 1, "
                              "not over the tokens")
        if k < logits.shape[-1] and torch.equal(_by_expert(*(-logits).topk(k, dim=-1))[1], is_):
            raise CheckFailed("you picked the k SMALLEST probabilities: keep the k largest "
                              "(torch.topk's default, largest=True)")
        raise CheckFailed("the chosen experts differ from the k experts with the largest router probability "
                          "(the k largest logits) of each token")
    if _close(ws, rws):
        return
    sums = w.float().sum(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    raw = _by_expert(probs.gather(-1, ref_i), ref_i)[0]
    if _close(ws, raw):
        raise CheckFailed("weights are not renormalised: they should sum to 1 over the k chosen experts "
                          f"(yours sum to {sums.min():.3f}..{sums.max():.3f}); divide by their sum")
    wrong_axis = torch.softmax(logits.float().gather(-1, ref_i), dim=0)
    if _close(ws, _by_expert(wrong_axis, ref_i)[0]):
        raise CheckFailed("the experts are right but the weights come from a softmax over the wrong axis: "
                          "normalise over the k kept experts of each token (dim=-1), not over the tokens")
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        raise CheckFailed("the experts are right but the weights do not sum to 1 over the k chosen experts "
                          f"(they sum to {sums.min():.3f}..{sums.max():.3f}): renormalise the probabilities of "
                          "the chosen experts")
    raise CheckFailed("the experts are right but the weights are not those experts' renormalised probabilities: "
                      "take softmax over ALL experts, gather the values at the chosen indices (topk gives both), "
                      "then divide by their sum (equivalently: softmax over the k kept logits)")


@checker("Exercise 2.1: topk_route")
def check_topk_route(student_fn) -> None:
    """``topk_route(logits [T, E], k) -> (weights [T, k] summing to 1, indices [T, k])``."""
    # A hand-made case whose answer you can verify on paper.
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 3.0, 3.0 + 2.0 ** 0.5]])
    w, i = _route_output(student_fn, logits, 2)
    _diagnose_route(logits, 2, w, i)

    # Random cases, several (T, E, k), including k = E (every expert) and a single token.
    for t, e, k in ((64, 8, 2), (33, 16, 4), (1, 8, 2), (10, 4, 4), (7, 6, 3)):
        logits = torch.randn(t, e) * 2.0
        w, i = _route_output(student_fn, logits, k)
        _diagnose_route(logits, k, w, i)

    # Top-1: a renormalised single gate is exactly 1 (the pitfall the chapter demonstrates).
    logits = torch.randn(16, 8)
    w, i = _route_output(student_fn, logits, 1)
    _diagnose_route(logits, 1, w, i)

    # Large logits: exp(100) overflows in float32 unless the softmax subtracts the max.
    logits = torch.randn(16, 8) * 3.0 + 100.0
    w, i = _route_output(student_fn, logits, 2)
    expect(bool(torch.isfinite(w).all()),
           "weights contain inf/nan for large logits: use torch.softmax (it subtracts the max before exp)")
    _diagnose_route(logits, 2, w, i)

    # The weights must stay differentiable: the router learns through them.
    logits = torch.randn(12, 8, requires_grad=True)
    w, i = _route_output(student_fn, logits, 2)
    expect(w.requires_grad, "weights carry no gradient: do not detach them or build them from argmax/one-hot; "
                            "the router is trained through these weights")
    cost = torch.randn(12, 8)  # a per-(token, expert) coefficient: the loss ignores the order of the k choices
    (cost.gather(1, i) * w).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    rw, ri = _reference_route(ref_logits, 2)
    (cost.gather(1, ri) * rw).sum().backward()
    expect(logits.grad is not None, "no gradient reached the logits: compute the weights from them with torch ops")
    expect_close(logits.grad, ref_logits.grad,
                 "the gradient reaching the logits differs from the reference: compute the weights with "
                 "differentiable torch ops from the softmax of the logits")


# --------------------------------------------------------------------------------------------
# Exercise 2.2: Switch load-balancing loss
# --------------------------------------------------------------------------------------------
def _balance_variants(probs: torch.Tensor, indices: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """The usual wrong answers, to name the one a student wrote."""
    t, k = indices.shape
    counts = torch.bincount(indices.reshape(-1), minlength=n).double()
    f = counts / (t * k)
    p = probs.double().mean(0)
    picked = torch.zeros_like(probs.double()).scatter(1, indices, probs.double().gather(1, indices))
    renorm = picked / picked.sum(-1, keepdim=True)
    own = torch.bincount(probs.topk(k, dim=-1).indices.reshape(-1), minlength=n).double() / (t * k)
    out = {}
    if int(indices.max()) == 0:  # bincount without minlength: a length-1 count that broadcasts over P
        out["no_minlength"] = n * (f[0] * p).sum()
    kept = (probs.double() * F.one_hot(indices, n).sum(1).clamp(max=1)).mean(0)
    out.update({
        "kept_p": n * (f * kept).sum(),
        "soft_f": n * (p * p).sum(),
        "no_n": (f * p).sum(),
        "renorm_p": n * (f * renorm.mean(0)).sum(),
        "per_token_f": n * ((counts / t) * p).sum(),
        "no_n_per_token": ((counts / t) * p).sum(),
        "own_topk": n * (own * p).sum(),
    })
    return out


_BALANCE_HINTS = {
    "kept_p": "P_i must average the FULL softmax probability of expert i over ALL T tokens (probs.mean(0)); you "
              "kept only the probabilities of the experts each token was sent to (zero elsewhere)",
    "soft_f": "f_i looks like the mean soft probability: f_i must COUNT the top-k assignments that went to expert i "
              "(e.g. torch.bincount of the indices) divided by the number of assignments; N*sum P_i^2 is a "
              "different objective",
    "no_n": "the N factor (num_experts) is missing: N * sum_i f_i P_i is 1 under perfect balance",
    "renorm_p": "P_i must be the mean FULL softmax probability of expert i over all tokens (probs.mean(0)), not the "
                "renormalised top-k weights (those are zero for unpicked experts)",
    "per_token_f": "f_i is divided by T instead of T*k: f counts all T*k assignments and must sum to 1 (so the "
                   "balanced value is 1 for any k)",
    "no_n_per_token": "the N factor is missing and f_i is divided by T instead of T*k",
    "own_topk": "f_i must be counted from the given `indices` (the experts the tokens were actually sent to, "
                "e.g. after noise or capacity), not re-derived from the top-k of probs",
    "no_minlength": "when only expert 0 is used, torch.bincount(indices) has length 1 and broadcasts over P: "
                    "experts nobody was sent to must still count, with f_i = 0, so pass minlength=num_experts",
}


class _Pending:
    """The first failed case whose output several mistakes explain: the hint waits for a case that names one."""

    def __init__(self) -> None:
        self.first: str | None = None

    def finish(self) -> None:
        if self.first is not None:
            raise CheckFailed(self.first)


def _balance_case(student_fn, probs: torch.Tensor, indices: torch.Tensor, n: int, what: str,
                  pending: _Pending | None = None) -> None:
    ref = load_balancing_loss(probs, indices, n)
    out = student_fn(probs.clone(), indices.clone(), n)
    expect(torch.is_tensor(out), f"switch_balance_loss must return a torch tensor, got {type(out).__name__}")
    expect(out.numel() == 1, f"the loss must be a scalar, got shape {tuple(out.shape)}: sum over the experts")
    if _close(out.reshape(()), ref, rtol=1e-4, atol=1e-6):
        return
    got = f"{what}: got {float(out):.4f}, expected {float(ref):.4f}."
    names = [name for name, value in _balance_variants(probs, indices, n).items()
             if not _close(value, ref, rtol=1e-6, atol=1e-9) and _close(out.reshape(()), value, rtol=1e-4, atol=1e-6)]
    if len(names) == 1:
        raise CheckFailed(f"{got} {_BALANCE_HINTS[names[0]]}")
    message = (f"{got} Compute N * sum_i f_i * P_i with f_i = (assignments to expert i) / (T*k) and "
               "P_i = probs[:, i].mean()")
    if pending is None or not names:
        raise CheckFailed(message)
    if pending.first is None:  # several mistakes give this number: a later case tells them apart
        pending.first = message


@checker("Exercise 2.2: switch_balance_loss")
def check_switch_balance_loss(student_fn) -> None:
    """``switch_balance_loss(probs [T, N], indices [T, k], num_experts) -> scalar`` = ``N sum_i f_i P_i``."""
    n = 4
    pending = _Pending()
    # Perfect balance: every expert gets the same share and the same mean probability -> 1.
    probs = torch.full((8, n), 1.0 / n)
    indices = torch.arange(8).remainder(n)[:, None]
    _balance_case(student_fn, probs, indices, n, "perfectly balanced top-1 routing should give 1", pending)
    # Collapse: every token sends everything to expert 0 -> N.
    probs = torch.zeros(8, n)
    probs[:, 0] = 1.0
    _balance_case(student_fn, probs, torch.zeros(8, 1, dtype=torch.long), n, f"total collapse should give N={n}",
                  pending)
    # Real-looking routing: softmax of random logits, the top-k of those probabilities.
    for t, e, k in ((64, 8, 2), (50, 4, 1), (128, 16, 4), (9, 8, 8)):
        probs = torch.softmax(torch.randn(t, e) * 1.5 + torch.linspace(0, 1.5, e), dim=-1)
        indices = probs.topk(k, dim=-1).indices
        _balance_case(student_fn, probs, indices, e, f"random routing (T={t}, N={e}, k={k})", pending)
    # Collapse with SOFT probabilities: every token is sent to expert 0 although the router gives it only
    # about 0.6 on average, so the loss is N * P_0 (< N); then top-2 collapse onto experts 0 and 1.
    probs = torch.softmax(torch.randn(16, n) * 0.5 + torch.tensor([1.5, 0.0, 0.0, 0.0]), dim=-1)
    _balance_case(student_fn, probs, torch.zeros(16, 1, dtype=torch.long), n,
                  "collapse onto expert 0 with soft probabilities (expected N * P_0)", pending)
    _balance_case(student_fn, probs, torch.tensor([[0, 1]]).repeat(16, 1), n,
                  "top-2 collapse onto experts 0 and 1 with soft probabilities", pending)
    # The indices need not be the top-k of probs (noisy routing, re-routed overflow): f counts what was sent.
    probs = torch.softmax(torch.randn(32, 8), dim=-1)
    _balance_case(student_fn, probs, probs.topk(2, dim=-1, largest=False).indices, 8,
                  "indices that are not the top-k of probs (T=32, N=8, k=2)", pending)
    pending.finish()

    # The loss trains the router only through P (f is a count): the gradient must match.
    probs = torch.softmax(torch.randn(32, 8), dim=-1).requires_grad_(True)
    indices = probs.detach().topk(2, dim=-1).indices
    out = student_fn(probs, indices, 8)
    expect(out.requires_grad, "the loss carries no gradient: P_i = probs[:, i].mean() must stay differentiable "
                              "(do not detach probs or convert it to numpy)")
    out.reshape(()).backward()
    ref_probs = probs.detach().clone().requires_grad_(True)
    load_balancing_loss(ref_probs, indices, 8).backward()
    expect_close(probs.grad, ref_probs.grad,
                 "the gradient with respect to probs is wrong: it should be N * f_i / T for every token and expert "
                 "i (f counted, hence constant; P the plain mean of probs)")


# --------------------------------------------------------------------------------------------
# Exercise 2.3: capacity mask
# --------------------------------------------------------------------------------------------
def _token_major(indices: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
    flat = indices.reshape(-1)
    pos = (F.one_hot(flat, n).cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    return (pos < capacity).view(indices.shape)


def _mask_case(student_fn, indices: torch.Tensor, n: int, capacity: int, what: str) -> None:
    ref = capacity_mask(indices, n, capacity)
    out = student_fn(indices.clone(), n, capacity)
    expect(torch.is_tensor(out), f"capacity_keep_mask must return a torch tensor, got {type(out).__name__}")
    expect(tuple(out.shape) == tuple(indices.shape),
           f"the mask must have the shape of indices {tuple(indices.shape)}, got {tuple(out.shape)}")
    expect(out.dtype == torch.bool, f"the mask must be a bool tensor (True = kept), got {out.dtype}; "
                                    "use a comparison such as position < capacity")
    if torch.equal(out, ref):
        return
    kept = torch.bincount(indices[out], minlength=n) if out.any() else torch.zeros(n, dtype=torch.long)
    t, k = indices.shape
    queue = indices.t().reshape(-1)
    unflattened = ((F.one_hot(queue, n).cumsum(0) - 1).gather(1, queue[:, None]).squeeze(1) < capacity).reshape(t, k)
    if k > 1 and torch.equal(out, unflattened) and not torch.equal(unflattened, ref):
        raise CheckFailed(f"{what}: you queued choice-major but reshaped the flat result straight to [T, k]: the "
                          "queue indices.t().reshape(-1) is ordered [k, T], so go back with .view(k, T).t()")
    if torch.equal(out, capacity_mask(indices, n, capacity + 1)) or int(kept.max()) > capacity:
        raise CheckFailed(f"{what}: an expert keeps {int(kept.max())} assignments but its capacity is {capacity} "
                          "(off by one?): with 0-based positions in the expert's queue, keep position < capacity")
    if torch.equal(out, _token_major(indices, n, capacity)):
        raise CheckFailed(f"{what}: you give priority in token order (token 0's choices, then token 1's ...). "
                          "Use choice-major priority as moe_course.dispatch.capacity_mask does: every token's FIRST "
                          "choice is queued before any SECOND choice (then token order), so a token loses its "
                          "second expert before another token loses its first")
    if torch.equal(out, capacity_mask(indices, n, max(capacity - 1, 0))):
        raise CheckFailed(f"{what}: each expert keeps one assignment too few: keep positions 0 .. capacity-1")
    if int(kept.max()) < capacity and bool((~out).any()):
        raise CheckFailed(f"{what}: you drop an assignment although its expert still has free slots; "
                          "only drop once an expert's queue already holds `capacity` assignments")
    raise CheckFailed(f"{what}: the mask differs from the reference at {int((out != ref).sum())} of "
                      f"{out.numel()} assignments; queue assignments choice-major (indices.t().reshape(-1)), number "
                      "each expert's queue 0, 1, 2 ..., keep those with position < capacity")


@checker("Exercise 2.3: capacity_keep_mask")
def check_capacity_keep_mask(student_fn) -> None:
    """``capacity_keep_mask(indices [T, k], num_experts, capacity) -> bool [T, k]`` (choice-major priority)."""
    # Hand-made: 4 tokens, top-2 over 3 experts, 2 slots each.
    #   first choices  0 0 0 1  -> expert 0 is full after tokens 0, 1: token 2's first choice is dropped
    #   second choices 1 1 2 0  -> expert 1 has 1 slot left after token 3's first choice; expert 0 is full
    indices = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    _mask_case(student_fn, indices, 3, 2, "the 4-token example")
    # Token-major and choice-major disagree here (see the chapter).
    indices = torch.tensor([[0, 1], [1, 0], [1, 2]])
    _mask_case(student_fn, indices, 3, 1, "the 3-token example with capacity 1")

    for t, e, k, cap in ((64, 8, 2, 10), (100, 4, 1, 20), (50, 8, 4, 30), (37, 6, 3, 5)):
        skew = torch.linspace(0, 2.5, e)  # uneven routing so that some experts overflow
        indices = (torch.randn(t, e) + skew).topk(k, dim=-1).indices
        _mask_case(student_fn, indices, e, cap, f"random routing (T={t}, N={e}, k={k}, capacity={cap})")

    indices = torch.randint(0, 8, (20, 1))
    _mask_case(student_fn, indices, 8, 0, "capacity 0 (everything dropped)")
    _mask_case(student_fn, indices, 8, 20, "capacity >= T (nothing dropped)")
    indices = torch.zeros(6, 1, dtype=torch.long)
    _mask_case(student_fn, indices, 4, 3, "every token on expert 0 (experts 1-3 unused)")


# --------------------------------------------------------------------------------------------
# Exercise 2.4: expert capacity, C = ceil(cf * T * k / N)
# --------------------------------------------------------------------------------------------
def _reference_capacity(t: int, n: int, k: int, cf: float) -> int:
    """What :meth:`SparseMoE.capacity` gives a layer of ``n`` experts, top-``k``, factor ``cf``, for ``t`` tokens."""
    return SparseMoE(1, n, 1, k=k, capacity_factor=cf).capacity(t)


def _capacity_variants(t: int, n: int, k: int, cf: float) -> dict[str, float]:
    """The usual wrong answers (as numbers), to name the one a student wrote."""
    x = cf * t * k / n
    return {
        "floor": math.floor(x),
        "round": round(x),
        "round_half_up": math.floor(x + 0.5),
        "no_k": math.ceil(cf * t / n),
        "no_cf": math.ceil(t * k / n),
        "plus_one": int(x) + 1,
        "ceil_early": k * math.ceil(cf * t / n),
        "div_k": math.ceil(cf * t / (n * k)),
        "swap": math.ceil(cf * n * k / t),
        "no_ceil": x,
    }


_CAPACITY_HINTS = {
    "floor": "you rounded DOWN (floor, int() or //): a capacity must round UP, C = ceil(cf * T * k / N), or even a "
             "perfectly balanced batch would drop assignments",
    "round": "you rounded to the NEAREST integer: a capacity must round UP (math.ceil), so 31.25 slots become 32",
    "round_half_up": "you rounded to the nearest integer (floor(x + 0.5)): a capacity must round UP (math.ceil), "
                     "so 31.25 slots become 32",
    "no_k": "k is missing: each of the T tokens makes k assignments, so under perfect balance an expert receives "
            "T * k / N of them",
    "no_cf": "the capacity_factor is missing: it scales the balanced load, C = ceil(capacity_factor * T * k / N)",
    "plus_one": "int(x) + 1 is not a ceiling: when cf * T * k / N is exactly a whole number (say 16.0) the "
                "capacity is exactly that number; use math.ceil",
    "ceil_early": "you rounded up before multiplying by k: round up once, at the end, ceil(cf * T * k / N)",
    "div_k": "k multiplies, it does not divide: the T tokens make T * k assignments in all",
    "swap": "T and N are swapped: the balanced load per expert is T * k / N (tokens times choices over experts)",
    "no_ceil": "the capacity is a whole number of slots: round cf * T * k / N UP with math.ceil",
}

# (T, N, k, cf): factors that are exact in binary, so every correct way of writing the formula gives
# the same float. Exact whole numbers, fractions below and above one half, and exact halves.
_CAPACITY_CASES = [
    (64, 8, 2, 1.0),      # 16 exactly
    (10, 4, 1, 1.0),      # 2.5 -> 3
    (100, 8, 2, 1.25),    # 31.25 -> 32
    (7, 3, 2, 1.5),       # 7 exactly
    (1, 8, 1, 0.5),       # 0.0625 -> 1: a single token still gets a slot
    (33, 16, 4, 2.0),     # 16.5 -> 17
    (1024, 64, 8, 1.25),  # 160 exactly
    (64, 8, 2, 0.75),     # 12 exactly, a factor below 1
    (5, 4, 4, 1.0),       # k = N: 5 exactly
    (20, 8, 2, 1.5),      # 7.5 -> 8
    (37, 6, 3, 1.0),      # 18.5 -> 19
]


def _capacity_value(out, what: str) -> float:
    if torch.is_tensor(out):
        expect(out.numel() == 1, f"{what}: return one number, got a tensor of shape {tuple(out.shape)}")
        out = out.item()
    expect(isinstance(out, numbers.Real) and not isinstance(out, bool),
           f"{what}: return a number (an int), got {type(out).__name__}")
    return float(out)


@checker("Exercise 2.4: expert_capacity", forbid=_NO_PACKAGE)
def check_expert_capacity(student_fn) -> None:
    """``expert_capacity(num_tokens, num_experts, k, capacity_factor) -> int`` = ``ceil(cf * T * k / N)``."""
    answers = []
    for t, n, k, cf in _CAPACITY_CASES:
        what = f"expert_capacity(num_tokens={t}, num_experts={n}, k={k}, capacity_factor={cf})"
        out = student_fn(t, n, k, cf)
        answers.append((what, out, _capacity_value(out, what), _reference_capacity(t, n, k, cf)))
    wrong = [(what, value, ref) for what, _, value, ref in answers if value != ref]
    if wrong:
        what, value, ref = wrong[0]
        got = f"{what} = {value:g}, expected {ref}"
        variants = [_capacity_variants(*case) for case in _CAPACITY_CASES]
        for name in _CAPACITY_HINTS:  # the mistake that explains every answer (one case alone is ambiguous)
            if all(math.isclose(v[name], a[2], rel_tol=1e-9) for v, a in zip(variants, answers)):
                raise CheckFailed(f"{got}. {_CAPACITY_HINTS[name]}")
        bad = next(i for i, a in enumerate(answers) if a[2] != a[3])
        for name, v in variants[bad].items():
            if v != answers[bad][3] and math.isclose(v, value, rel_tol=1e-9):
                raise CheckFailed(f"{got}. {_CAPACITY_HINTS[name]}")
        raise CheckFailed(f"{got}. Compute C = ceil(capacity_factor * num_tokens * k / num_experts) with math.ceil")
    for what, out, _, _ in answers:
        expect(isinstance(out, numbers.Integral) and not isinstance(out, bool),
               f"{what} returned {out!r} ({type(out).__name__}); return a Python int (math.ceil returns one): a "
               "capacity counts slots, and capacity_mask takes an int")
    # Agreement with a real layer: the slots the package gives each expert of a SparseMoE.
    layer = SparseMoE(8, 4, 8, k=2, capacity_factor=1.25)
    for t in (1, 3, 64, 100):
        got = _capacity_value(student_fn(t, 4, 2, 1.25), "SparseMoE layer")
        expect(got == layer.capacity(t), f"SparseMoE(num_experts=4, k=2, capacity_factor=1.25).capacity({t}) is "
                                         f"{layer.capacity(t)} slots per expert, you computed {got:g}")


# ============================================================================================
# The exercises as the notebook asks them now: variants the chapter does not show, and one that
# runs the learner's code on a zoo model. (The checkers above remain for older notebooks.)
# ============================================================================================


# --------------------------------------------------------------------------------------------
# Exercise 2.1: expert-choice routing (Zhou et al., 2022)
# --------------------------------------------------------------------------------------------
def _reference_expert_choice(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    w, tok = probs.t().topk(capacity, dim=-1)
    return w, tok


def _by_token(weights: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = tokens.argsort(dim=-1)
    return weights.gather(-1, order), tokens.gather(-1, order)


def _expert_choice_output(student_fn, logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = student_fn(logits.clone(), capacity)
    expect(isinstance(out, (tuple, list)) and len(out) == 2,
           f"expert_choice_route must return a pair (weights, tokens), got {type(out).__name__}")
    w, tok = out
    expect(torch.is_tensor(w) and torch.is_tensor(tok), "both weights and tokens must be torch tensors")
    t, n = logits.shape
    if tuple(tok.shape) == (t, capacity) and (t, capacity) != (n, capacity):
        raise CheckFailed(f"you returned one row per TOKEN ({t} x {capacity}): that is token choice (each token picks "
                          f"experts). In expert choice each of the {n} experts picks its {capacity} tokens: take the "
                          "top-C along the TOKEN axis of the probabilities, one row per expert, shape [N, C]")
    if tuple(tok.shape) == (capacity, n) and capacity != n:
        raise CheckFailed(f"shape {tuple(tok.shape)} is transposed: return one row per expert, shape [N, C] = "
                          f"({n}, {capacity}) (topk over the tokens of probs.T, or transpose the result)")
    expect(tuple(w.shape) == (n, capacity) and tuple(tok.shape) == (n, capacity),
           f"for logits of shape {tuple(logits.shape)} and capacity={capacity}, weights and tokens must both have "
           f"shape [N, C] = ({n}, {capacity}); got {tuple(w.shape)} and {tuple(tok.shape)}")
    expect(not tok.dtype.is_floating_point, f"tokens must be integer indices (torch.long), got {tok.dtype}")
    return w, tok.long()


def _diagnose_expert_choice(logits: torch.Tensor, capacity: int, w: torch.Tensor, tok: torch.Tensor) -> None:
    ref_w, ref_t = _by_token(*_reference_expert_choice(logits, capacity))
    ws, ts = _by_token(w.float(), tok)
    x = logits.float()
    if not torch.equal(ts, ref_t):
        if torch.equal(_by_token(*x.t().topk(capacity, dim=-1))[1], ts):
            raise CheckFailed("each expert ranked the tokens by their raw logit for it (or by a softmax over the "
                              "TOKENS, dim=0, which orders them the same way): rank them by the router probability "
                              "softmax(logits, dim=-1)[:, i], normalised over the experts of each token; a logit means "
                              "something only next to the same token's other logits")
        if capacity < x.shape[0] and torch.equal(
                _by_token(*torch.softmax(x, dim=-1).t().topk(capacity, dim=-1, largest=False))[1], ts):
            raise CheckFailed("each expert took the tokens with the SMALLEST probability: keep the largest")
        raise CheckFailed("the chosen tokens differ from the `capacity` tokens with the largest router probability "
                          "for each expert (top-C of softmax(logits, dim=-1)[:, i] over the tokens)")
    if _close(ws, ref_w):
        return
    if _close(ws, ref_w / ref_w.sum(-1, keepdim=True)):
        raise CheckFailed("the tokens are right but you renormalised each expert's weights to sum to 1: in expert "
                          "choice a token's weight for an expert is its router probability as it is (a token may be "
                          "picked by several experts or by none)")
    if _close(ws, _by_token(x.t().gather(1, tok), tok)[0]):
        raise CheckFailed("the tokens are right but the weights are raw logits: use the router probabilities "
                          "softmax(logits, dim=-1) of the chosen tokens")
    raise CheckFailed("the tokens are right but the weights are not their router probabilities "
                      "softmax(logits, dim=-1)[token, expert]")


@checker("Exercise 2.1: expert_choice_route", forbid=_NO_PACKAGE)
def check_expert_choice_route(student_fn) -> None:
    """``expert_choice_route(logits [T, N], capacity) -> (weights [N, C], tokens [N, C])``."""
    # Shapes first, on a case with fewer picks per expert than experts: [N, C], one row per expert.
    logits = torch.randn(12, 6) * 2.0
    w, tok = _expert_choice_output(student_fn, logits, 3)
    _diagnose_expert_choice(logits, 3, w, tok)
    # Hand-made: 4 tokens, 2 experts, capacity 3. Token 3's logits (3, 5) make expert 1 its favourite
    # although its logit 3 for expert 0 is the largest logit expert 0 sees.
    logits = torch.tensor([[2.0, 0.0], [1.0, -0.5], [0.0, 0.5], [3.0, 5.0]])  # no tied probabilities
    w, tok = _expert_choice_output(student_fn, logits, 3)
    _diagnose_expert_choice(logits, 3, w, tok)
    for t, n, c in ((64, 8, 16), (33, 4, 5), (10, 6, 10), (12, 3, 1)):
        logits = torch.randn(t, n) * 2.0 + torch.randn(t, 1) * 3.0  # per-token offsets: logits != probabilities
        w, tok = _expert_choice_output(student_fn, logits, c)
        _diagnose_expert_choice(logits, c, w, tok)
    logits = torch.randn(16, 8) * 3.0 + 100.0
    w, tok = _expert_choice_output(student_fn, logits, 4)
    expect(bool(torch.isfinite(w).all()),
           "weights contain inf/nan for large logits: use torch.softmax (it subtracts the max before exp)")
    _diagnose_expert_choice(logits, 4, w, tok)
    logits = torch.randn(20, 4, requires_grad=True)
    w, tok = _expert_choice_output(student_fn, logits, 5)
    expect(w.requires_grad, "weights carry no gradient: do not detach them; the router is trained through them")
    cost = torch.randn(4, 20)  # a per-(expert, token) coefficient: ignores the order of an expert's picks
    (cost.gather(1, tok) * w).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    rw, rt = _reference_expert_choice(ref_logits, 5)
    (cost.gather(1, rt) * rw).sum().backward()
    expect_close(logits.grad, ref_logits.grad,
                 "the gradient reaching the logits differs from the reference: compute the weights with "
                 "differentiable torch ops from softmax(logits, dim=-1)")


# --------------------------------------------------------------------------------------------
# Exercise 2.2: the Switch loss over a padded batch
# --------------------------------------------------------------------------------------------
def _masked_reference(probs, indices, mask, n):
    real = mask.bool()
    return load_balancing_loss(probs[real], indices[real], n)


def _masked_variants(probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    p, ix, real = probs.double(), indices, mask.bool()
    k = ix.shape[-1]

    def f_of(sel, denom):
        return torch.bincount(ix[sel].reshape(-1), minlength=n).double() / denom

    f_real = f_of(real, max(int(real.sum()) * k, 1))
    p_real = p[real].mean(0)
    f_all = f_of(torch.ones_like(real), ix.numel())
    p_all = p.reshape(-1, n).mean(0)
    one_hot = F.one_hot(ix[real], n).sum(1).clamp(max=1).double()
    return {
        "ignore_mask": n * (f_all * p_all).sum(),
        "f_only": n * (f_real * p_all).sum(),
        "p_only": n * (f_all * p_real).sum(),
        "denominator_all": n * (f_of(real, ix.numel()) * (p * real[..., None]).reshape(-1, n).sum(0) / real.numel()).sum(),
        "inverted": n * (f_of(~real, max(int((~real).sum()) * k, 1)) * (p[~real].mean(0) if (~real).any() else p_all)).sum(),
        "soft_f": n * (p_real * p_real).sum(),
        "kept_p": n * (f_real * (p[real] * one_hot).mean(0)).sum(),
        "no_n": (f_real * p_real).sum(),
        "per_token_f": n * (f_real * k * p_real).sum(),
    }


_MASKED_HINTS = {
    "ignore_mask": "the padding tokens count: use only the real tokens (attention_mask == 1), in f AND in P",
    "f_only": "you masked f but P_i still averages over the padding tokens too: take the mean of probs over the "
              "real tokens only",
    "p_only": "you masked P but f still counts the padding tokens' assignments: count only the real tokens' "
              "indices, divided by (real tokens) * k",
    "denominator_all": "you zeroed the padding tokens but still divided by all B*S tokens: divide f by "
                       "(number of real tokens) * k and P by the number of real tokens",
    "inverted": "you used the PADDING tokens: attention_mask is 1 (True) for real tokens and 0 for padding",
    "soft_f": "f_i looks like the mean soft probability: f_i must COUNT the assignments to expert i (torch.bincount "
              "of the real tokens' indices) divided by their number",
    "kept_p": "P_i must average the FULL softmax probability of expert i over all real tokens (probs[real].mean(0)); "
              "you kept only the probabilities of the experts each token was sent to (zero elsewhere)",
    "no_n": "the N factor (num_experts) is missing: N * sum_i f_i P_i is 1 under perfect balance",
    "per_token_f": "f_i is divided by the number of tokens instead of tokens * k: f counts all assignments and "
                   "must sum to 1",
}


def _masked_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, str]]:
    g = torch.Generator().manual_seed(22)
    out = []
    # Hand-made: 2 sequences of 4 positions, the second with 2 padding positions sent to expert 0.
    n = 4
    probs = torch.full((2, 4, n), 1.0 / n)
    indices = torch.tensor([[[0], [1], [2], [3]], [[1], [2], [0], [0]]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    probs[1, 2:] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    out.append((probs, indices, mask, n, "the 2-sequence example (the last 2 positions of sequence 1 are padding)"))
    for b, s, e, k in ((4, 16, 8, 2), (3, 10, 4, 1), (2, 32, 16, 4)):
        probs = torch.softmax(torch.randn(b, s, e, generator=g) * 1.5 + torch.linspace(0, 1.5, e), dim=-1)
        indices = probs.topk(k, dim=-1).indices
        lengths = torch.randint(1, s + 1, (b,), generator=g)
        lengths[0] = s
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        out.append((probs, indices, mask, e, f"a padded batch (B={b}, S={s}, N={e}, k={k})"))
    # Bool mask, padding that the router sends to one expert: masking matters a lot here.
    probs = torch.softmax(torch.randn(2, 12, 8, generator=g), dim=-1)
    indices = probs.topk(2, dim=-1).indices
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 8:] = False
    indices[:, 8:] = torch.tensor([0, 1])
    out.append((probs, indices, mask, 8, "a bool mask with padding routed to experts 0 and 1"))
    return out


@checker("Exercise 2.2: masked_balance_loss", forbid=_NO_PACKAGE)
def check_masked_balance_loss(student_fn) -> None:
    """``masked_balance_loss(probs [B, S, N], indices [B, S, k], attention_mask [B, S], num_experts) -> scalar``."""
    results = []
    for probs, indices, mask, n, what in _masked_cases():
        out = student_fn(probs.clone(), indices.clone(), mask.clone(), n)
        expect(torch.is_tensor(out), f"masked_balance_loss must return a torch tensor, got {type(out).__name__}")
        expect(out.numel() == 1, f"{what}: the loss must be a scalar, got shape {tuple(out.shape)}")
        results.append((float(out), float(_masked_reference(probs, indices, mask, n)), probs, indices, mask, n, what))
    wrong = [r for r in results if not math.isclose(r[0], r[1], rel_tol=1e-4, abs_tol=1e-6)]
    if wrong:
        got = f"{wrong[0][6]}: got {wrong[0][0]:.4f}, expected {wrong[0][1]:.4f}."
        variants = [_masked_variants(p, i, m, n) for _, _, p, i, m, n, _ in results]
        for name in _MASKED_HINTS:  # the mistake that explains every case (one case alone can be ambiguous)
            if all(math.isclose(v[name].item(), r[0], rel_tol=1e-4, abs_tol=1e-6) for v, r in zip(variants, results)):
                raise CheckFailed(f"{got} {_MASKED_HINTS[name]}")
        raise CheckFailed(f"{got} Over the real tokens only (attention_mask == 1): N * sum_i f_i P_i with f_i = "
                          "(their assignments to expert i) / (real tokens * k) and P_i = their mean probability")
    probs, indices, mask, n, _ = _masked_cases()[1]
    probs = probs.clone().requires_grad_(True)
    out = student_fn(probs, indices, mask, n)
    expect(out.requires_grad, "the loss carries no gradient: P must stay differentiable (do not detach probs)")
    out.reshape(()).backward()
    ref = probs.detach().clone().requires_grad_(True)
    _masked_reference(ref, indices, mask, n).backward()
    expect_close(probs.grad, ref.grad, "the gradient with respect to probs is wrong: padding tokens must get zero "
                                       "gradient, real tokens N * f_i / (number of real tokens)")


# --------------------------------------------------------------------------------------------
# Exercise 2.3: batch prioritized routing (Riquelme et al., 2021)
# --------------------------------------------------------------------------------------------
def _choice_major(indices: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
    t, k = indices.shape
    queue = indices.t().reshape(-1)
    pos = (F.one_hot(queue, n).cumsum(0) - 1).gather(1, queue[:, None]).squeeze(1)
    return (pos < capacity).view(k, t).t()


def _reference_priority(indices, weights, n, capacity, descending=True, unpermute=True, order_fn=None):
    score = weights.float().max(dim=1).values
    order = torch.argsort(score, descending=descending, stable=True)
    kept = (order_fn or _choice_major)(indices[order], n, capacity)
    if not unpermute:
        return kept
    keep = torch.empty_like(kept)
    keep[order] = kept
    return keep


def _per_assignment_priority(indices, weights, n, capacity):
    t, k = indices.shape
    queue, w = indices.t().reshape(-1), weights.float().t().reshape(-1)
    order = torch.argsort(w, descending=True, stable=True)
    q = queue[order]
    pos_sorted = (F.one_hot(q, n).cumsum(0) - 1).gather(1, q[:, None]).squeeze(1)
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return (pos < capacity).view(k, t).t()


_PRIORITY_VARIANTS = {
    "no_priority": lambda i, w, n, c: _choice_major(i, n, c),
    "ascending": lambda i, w, n, c: _reference_priority(i, w, n, c, descending=False),
    "not_unpermuted": lambda i, w, n, c: _reference_priority(i, w, n, c, unpermute=False),
    "token_major": lambda i, w, n, c: _reference_priority(i, w, n, c, order_fn=_token_major),
    "per_assignment": _per_assignment_priority,
    "off_by_one": lambda i, w, n, c: _reference_priority(i, w, n, c + 1),
    "one_too_few": lambda i, w, n, c: _reference_priority(i, w, n, max(c - 1, 0)),
}

_PRIORITY_HINTS = {
    "no_priority": "you ignored the weights: that is the chapter's choice-major order by token position. Sort the "
                   "tokens by their largest gate weight (highest first), then queue choice-major in that order",
    "ascending": "you served the LEAST confident tokens first: sort by the largest gate weight in DEScending order",
    "not_unpermuted": "your rows are in priority order, not in token order: put each sorted row back at its token "
                      "(keep[order] = kept_sorted)",
    "token_major": "within the priority order queue choice-major (every token's first choice before any second "
                   "choice), not token by token",
    "per_assignment": "the priority belongs to the TOKEN (its largest gate weight, the same for all of its k "
                      "choices), not to each assignment's own weight; then queue choice-major in that token order",
    "off_by_one": "an expert keeps one assignment too many (off by one?): keep queue positions 0 .. capacity-1",
    "one_too_few": "each expert keeps one assignment too few: keep queue positions 0 .. capacity-1",
}


def _priority_cases():
    g = torch.Generator().manual_seed(23)
    cases = [
        # token 2 is the most confident: it is served first and takes expert 1's only slot from token 1
        (torch.tensor([[0, 1], [1, 0], [1, 2]]), torch.tensor([[0.6, 0.4], [0.55, 0.45], [0.9, 0.1]]), 3, 1,
         "the 3-token example with capacity 1"),
        # equal scores: the tie keeps token order (a stable sort), i.e. the chapter's choice-major mask
        (torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]]), torch.full((4, 2), 0.5), 3, 2, "equal weights (a tie)"),
    ]
    for t, e, k, cap in ((64, 8, 2, 10), (100, 4, 1, 20), (50, 8, 4, 30), (37, 6, 3, 5)):
        logits = torch.randn(t, e, generator=g) * 1.5 + torch.linspace(0, 2.5, e)
        w, i = torch.softmax(logits, -1).topk(k, dim=-1)
        cases.append((i, w / w.sum(-1, keepdim=True), e, cap, f"random routing (T={t}, N={e}, k={k}, capacity={cap})"))
    i = torch.randint(0, 8, (20, 2), generator=g)
    w = torch.rand(20, 2, generator=g)
    cases.append((i, w, 8, 0, "capacity 0 (everything dropped)"))
    cases.append((i, w, 8, 40, "capacity >= T*k (nothing dropped)"))
    return cases


@checker("Exercise 2.3: priority_keep_mask", forbid=_NO_PACKAGE)
def check_priority_keep_mask(student_fn) -> None:
    """``priority_keep_mask(indices [T, k], weights [T, k], num_experts, capacity) -> bool [T, k]``."""
    results = []
    for indices, weights, n, cap, what in _priority_cases():
        out = student_fn(indices.clone(), weights.clone(), n, cap)
        expect(torch.is_tensor(out), f"priority_keep_mask must return a torch tensor, got {type(out).__name__}")
        expect(tuple(out.shape) == tuple(indices.shape),
               f"{what}: the mask must have the shape of indices {tuple(indices.shape)}, got {tuple(out.shape)}")
        expect(out.dtype == torch.bool, f"the mask must be a bool tensor (True = kept), got {out.dtype}")
        results.append((out, _reference_priority(indices, weights, n, cap), indices, weights, n, cap, what))
    wrong = [r for r in results if not torch.equal(r[0], r[1])]
    if wrong:
        out, ref, indices, _, n, cap, what = wrong[0]
        got = f"{what}: the mask differs from the reference at {int((out != ref).sum())} of {out.numel()} assignments."
        for name, variant in _PRIORITY_VARIANTS.items():
            if all(torch.equal(r[0], variant(r[2], r[3], r[4], r[5])) for r in results):
                raise CheckFailed(f"{got} {_PRIORITY_HINTS[name]}")
        kept = torch.bincount(indices[out], minlength=n) if out.any() else torch.zeros(n, dtype=torch.long)
        if int(kept.max()) > cap:
            raise CheckFailed(f"{got} An expert keeps {int(kept.max())} assignments but its capacity is {cap}")
        raise CheckFailed(f"{got} Order the tokens by their largest gate weight (highest first, ties in token order: "
                          "a stable sort), queue their assignments choice-major in that order, keep queue positions "
                          "< capacity, and return the mask in the original token order")


# --------------------------------------------------------------------------------------------
# Exercise 2.5 (use it): how much does a real model drop at capacity factors 1.0 and 1.25?
# --------------------------------------------------------------------------------------------
def _drop_counts(indices, weights, n, cf, batch_tokens, mask_fn=None, cap_tokens=None) -> tuple[float, float]:
    """(dropped assignments / all assignments, tokens with every assignment dropped / all tokens)."""
    k = indices.shape[1]
    dropped = skipped = 0
    for start in range(0, len(indices), batch_tokens):
        ix, w = indices[start:start + batch_tokens], weights[start:start + batch_tokens]
        cap = math.ceil(cf * (cap_tokens or len(ix)) * k / n)
        keep = (mask_fn or _reference_priority)(ix, w, n, cap)
        dropped += int((~keep).sum())
        skipped += int((~keep.any(dim=1)).sum())
    return dropped / indices.numel(), skipped / len(indices)


def _reference_dropped(indices, weights, n, cf, batch_tokens=2560) -> tuple[float, float]:
    return _drop_counts(indices, weights, n, cf, batch_tokens)


def _dropped_variants(indices, weights, n, cf, batch_tokens=2560) -> dict[str, tuple[float, float]]:
    k = indices.shape[1]
    d, s = _reference_dropped(indices, weights, n, cf, batch_tokens)
    any_dropped = _drop_counts(indices, weights, n, cf, batch_tokens,
                               mask_fn=lambda i, w, n_, c: _reference_priority(i, w, n_, c).all(1, keepdim=True)
                               .expand_as(i))
    return {
        "kept": (1 - d, 1 - s),
        "kept_d": (1 - d, s),
        "percent": (100 * d, 100 * s),
        "per_token": (d * k, s),
        "full_capacity_last": _drop_counts(indices, weights, n, cf, batch_tokens, cap_tokens=batch_tokens),
        "one_batch": _drop_counts(indices, weights, n, cf, len(indices)),
        "choice_major": _drop_counts(indices, weights, n, cf, batch_tokens,
                                     mask_fn=lambda i, w, n_, c: _choice_major(i, n_, c)),
        "any_dropped": (d, any_dropped[1]),
        "swapped": (s, d),
    }


_DROPPED_HINTS = {
    "kept": "you returned KEPT fractions: the question asks for the dropped assignments and the skipped tokens",
    "kept_d": "the first number is the KEPT fraction of assignments: return the dropped one (1 - kept)",
    "percent": "you returned percentages: return fractions between 0 and 1",
    "per_token": "you divided the dropped assignments by the number of TOKENS: divide by the number of assignments "
                 "(tokens * k)",
    "full_capacity_last": "the last, shorter batch got the capacity of a full batch: compute each batch's capacity "
                          "from its own number of tokens, expert_capacity(len(batch), ...)",
    "one_batch": "you applied one capacity to all tokens at once: split them into consecutive batches of "
                 "batch_tokens tokens, each with its own capacity (a layer sees one batch at a time)",
    "choice_major": "your numbers match the chapter's choice-major mask, not batch prioritized routing: use your "
                    "priority_keep_mask from exercise 2.3 (the order decides WHICH tokens lose all their experts)",
    "any_dropped": "a token skips the layer only when ALL its k assignments are dropped, not when any one is",
    "swapped": "the two numbers are swapped: return (dropped assignments fraction, skipped tokens fraction)",
}


def _dropped_synthetic():
    g = torch.Generator().manual_seed(25)
    out = []
    for t, e, k, bt in ((700, 8, 2, 256), (300, 4, 1, 100), (500, 8, 2, 160)):
        logits = torch.randn(t, e, generator=g) + torch.linspace(0, 1.5, e)
        w, i = torch.softmax(logits, -1).topk(k, dim=-1)
        out.append((i, w / w.sum(-1, keepdim=True), e, bt))
    return out


_REAL: dict = {}


def real_routing() -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 of the ``mnist1d-moe`` zoo model on its validation split: ``(indices [8192, 2], gate weights)``."""
    if not _REAL:
        from moe_course import metrics, zoo  # the zoo trains the model on first use, then loads it from the cache
        model = zoo.pretrained("mnist1d-moe", progress=False)
        stats = metrics.routing_stats(model, zoo.data("mnist1d-moe")["validation"], batch_size=500, device="cpu")
        _REAL["routing"] = (stats[0].indices.cpu().clone(), stats[0].gate_weights.float().cpu().clone())
    return _REAL["routing"]


def _dropped_pair(out, what: str) -> tuple[float, float]:
    expect(isinstance(out, (tuple, list)) and len(out) == 2,
           f"{what}: return a pair (dropped assignments fraction, skipped tokens fraction), got {describe(out)}")
    values = []
    for v in out:
        if torch.is_tensor(v):
            expect(v.numel() == 1, f"{what}: each number must be a scalar, got a tensor of shape {tuple(v.shape)}")
            v = v.item()
        expect(isinstance(v, numbers.Real) and not isinstance(v, bool),
               f"{what}: return two numbers (floats), got {type(v).__name__}")
        values.append(float(v))
    return values[0], values[1]


def _pair_close(a, b, tol) -> bool:
    return abs(a[0] - b[0]) <= tol and abs(a[1] - b[1]) <= tol


@checker("Exercise 2.5: dropped_fraction on a real model", forbid=_NO_PACKAGE, timeout=120)
def check_dropped_fraction(student_fn) -> None:
    """``dropped_fraction(indices, weights, num_experts, capacity_factor, batch_tokens) -> (dropped, skipped)``
    on synthetic routing, then on the real routing of the mnist1d-moe model at capacity factors 1.0 and 1.25
    (tolerance 0.002 on each number)."""
    for indices, weights, n, bt in _dropped_synthetic():
        for cf in (1.0, 1.25):
            what = f"synthetic routing (T={len(indices)}, N={n}, k={indices.shape[1]}, cf={cf}, batch_tokens={bt})"
            got = _dropped_pair(student_fn(indices.clone(), weights.clone(), n, cf, bt), what)
            ref = _reference_dropped(indices, weights, n, cf, bt)
            if _pair_close(got, ref, 1e-6):
                continue
            text = f"{what}: got ({got[0]:.4f}, {got[1]:.4f}), expected ({ref[0]:.4f}, {ref[1]:.4f})."
            for name, value in _dropped_variants(indices, weights, n, cf, bt).items():
                if not _pair_close(value, ref, 1e-6) and _pair_close(got, value, 1e-6):
                    raise CheckFailed(f"{text} {_DROPPED_HINTS[name]}")
            raise CheckFailed(f"{text} Split the tokens into consecutive batches of batch_tokens, give each batch "
                              "C = expert_capacity(len(batch), N, k, cf), mask it with priority_keep_mask; return "
                              "(dropped assignments / all assignments, tokens with none kept / all tokens)")
    indices, weights = real_routing()
    lines = []
    for cf in (1.0, 1.25):
        got = _dropped_pair(student_fn(indices.clone(), weights.clone(), 8, cf, 2560), f"real routing, cf={cf}")
        ref = _reference_dropped(indices, weights, 8, cf)
        expect(_pair_close(got, ref, 0.002), f"on the mnist1d-moe model's layer 0 at cf={cf} you get "
                                             f"({got[0]:.4f}, {got[1]:.4f}), the reference ({ref[0]:.4f}, "
                                             f"{ref[1]:.4f}) (tolerance 0.002 on each)")
        lines.append(f"cf={cf}: {100 * got[0]:.2f}% of assignments dropped, {100 * got[1]:.2f}% of tokens skip the layer")
    print("mnist1d-moe, layer 0, 8192 validation tokens in batches of 2560: " + "; ".join(lines))
