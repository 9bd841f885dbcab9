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

from .core import CheckFailed, checker, expect, expect_close

__all__ = ["check_topk_route", "check_switch_balance_loss", "check_capacity_keep_mask", "check_expert_capacity"]


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
    out.update({
        "soft_f": n * (p * p).sum(),
        "no_n": (f * p).sum(),
        "renorm_p": n * (f * renorm.mean(0)).sum(),
        "per_token_f": n * ((counts / t) * p).sum(),
        "no_n_per_token": ((counts / t) * p).sum(),
        "own_topk": n * (own * p).sum(),
    })
    return out


_BALANCE_HINTS = {
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


def _balance_case(student_fn, probs: torch.Tensor, indices: torch.Tensor, n: int, what: str) -> None:
    ref = load_balancing_loss(probs, indices, n)
    out = student_fn(probs.clone(), indices.clone(), n)
    expect(torch.is_tensor(out), f"switch_balance_loss must return a torch tensor, got {type(out).__name__}")
    expect(out.numel() == 1, f"the loss must be a scalar, got shape {tuple(out.shape)}: sum over the experts")
    if _close(out.reshape(()), ref, rtol=1e-4, atol=1e-6):
        return
    for name, value in _balance_variants(probs, indices, n).items():
        if not _close(value, ref, rtol=1e-6, atol=1e-9) and _close(out.reshape(()), value, rtol=1e-4, atol=1e-6):
            raise CheckFailed(f"{what}: got {float(out):.4f}, expected {float(ref):.4f}. {_BALANCE_HINTS[name]}")
    raise CheckFailed(f"{what}: got {float(out):.4f}, expected {float(ref):.4f}. Compute "
                      "N * sum_i f_i * P_i with f_i = (assignments to expert i) / (T*k) and P_i = probs[:, i].mean()")


@checker("Exercise 2.2: switch_balance_loss")
def check_switch_balance_loss(student_fn) -> None:
    """``switch_balance_loss(probs [T, N], indices [T, k], num_experts) -> scalar`` = ``N sum_i f_i P_i``."""
    n = 4
    # Perfect balance: every expert gets the same share and the same mean probability -> 1.
    probs = torch.full((8, n), 1.0 / n)
    indices = torch.arange(8).remainder(n)[:, None]
    _balance_case(student_fn, probs, indices, n, "perfectly balanced top-1 routing should give 1")
    # Collapse: every token sends everything to expert 0 -> N.
    probs = torch.zeros(8, n)
    probs[:, 0] = 1.0
    _balance_case(student_fn, probs, torch.zeros(8, 1, dtype=torch.long), n, f"total collapse should give N={n}")
    # Real-looking routing: softmax of random logits, the top-k of those probabilities.
    for t, e, k in ((64, 8, 2), (50, 4, 1), (128, 16, 4), (9, 8, 8)):
        probs = torch.softmax(torch.randn(t, e) * 1.5 + torch.linspace(0, 1.5, e), dim=-1)
        indices = probs.topk(k, dim=-1).indices
        _balance_case(student_fn, probs, indices, e, f"random routing (T={t}, N={e}, k={k})")
    # Collapse with SOFT probabilities: every token is sent to expert 0 although the router gives it only
    # about 0.6 on average, so the loss is N * P_0 (< N); then top-2 collapse onto experts 0 and 1.
    probs = torch.softmax(torch.randn(16, n) * 0.5 + torch.tensor([1.5, 0.0, 0.0, 0.0]), dim=-1)
    _balance_case(student_fn, probs, torch.zeros(16, 1, dtype=torch.long), n,
                  "collapse onto expert 0 with soft probabilities (expected N * P_0)")
    _balance_case(student_fn, probs, torch.tensor([[0, 1]]).repeat(16, 1), n,
                  "top-2 collapse onto experts 0 and 1 with soft probabilities")
    # The indices need not be the top-k of probs (noisy routing, re-routed overflow): f counts what was sent.
    probs = torch.softmax(torch.randn(32, 8), dim=-1)
    _balance_case(student_fn, probs, probs.topk(2, dim=-1, largest=False).indices, 8,
                  "indices that are not the top-k of probs (T=32, N=8, k=2)")

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


@checker("Exercise 2.4: expert_capacity")
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
