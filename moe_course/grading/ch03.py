"""Checkers for chapter 3, measuring an MoE: active parameters, expert frequencies, perplexity,
and (a "use it" exercise) the load coefficient of variation of the ``digits-moe`` zoo model.

Each checker compares the student's function with the package's reference
(:meth:`moe_course.layers.SparseMoE.active_params_per_token`, the ``frequency`` of
:func:`moe_course.metrics.routing_stats`, the perplexity of :func:`moe_course.train.evaluate`)
on a hand-made case, random cases and edge cases, and recognises the usual wrong answers so that
the hint names the mistake, not just the gap.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from moe_course.layers import SparseMoE

from .core import CheckFailed, checker, expect

__all__ = ["check_active_params_per_token", "check_expert_frequency", "check_perplexity", "check_load_cv"]


# --------------------------------------------------------------------------------------------
# Exercise 3.1: active parameters per token of one MoE layer
# --------------------------------------------------------------------------------------------
def _matrices(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def _reference_active(d: int, f: int, n: int, k: int, activation: str, shared: int) -> int:
    """Router ``d*N`` + ``(k + S)`` experts of ``c*d*f`` weights (c = 3 for SwiGLU, else 2)."""
    return d * n + (k + shared) * _matrices(activation) * d * f


def _active_variants(d: int, f: int, n: int, k: int, activation: str, shared: int) -> dict[str, int]:
    """The usual wrong answers, to name the one a student wrote."""
    c = _matrices(activation)
    return {
        "all_experts": d * n + (n + shared) * c * d * f,
        "no_router": (k + shared) * c * d * f,
        "two_matrices": d * n + (k + shared) * 2 * d * f,
        "no_shared": d * n + k * c * d * f,
        "router_dk": d * k + (k + shared) * c * d * f,
        "flops": 2 * (d * n + (k + shared) * c * d * f),
        "one_matrix": d * n + (k + shared) * d * f,
    }


_ACTIVE_HINTS = {
    "all_experts": "you counted ALL num_experts experts: a token runs only its k routed experts (plus the shared ones); "
                   "the others hold parameters but do no work for this token",
    "no_router": "the router is missing: every token runs the router Linear(d_model, num_experts), d_model * num_experts "
                 "weights, to choose its experts",
    "two_matrices": "with activation='swiglu' an expert has THREE matrices (w_in, w_gate, w_out: 3 * d_model * d_hidden); "
                    "with 'gelu' it has two",
    "no_shared": "the shared experts are missing: each of the num_shared experts runs on every token, so its "
                 "weights are active too",
    "router_dk": "the router maps d_model to num_experts scores, so it has d_model * num_experts weights, not d_model * k: "
                 "it scores every expert before the top-k is taken",
    "flops": "that is twice the answer: you computed FLOPs (2 per multiply-accumulate), the exercise asks for parameters",
    "one_matrix": "an expert is an MLP d_model -> d_hidden -> d_model: at least two matrices (three with SwiGLU), "
                  "not one d_model * d_hidden matrix",
}


def _as_int(out, what: str) -> int:
    if torch.is_tensor(out):
        expect(out.numel() == 1, f"{what}: return one number, got a tensor of shape {tuple(out.shape)}")
        out = out.item()
    expect(isinstance(out, numbers.Real) and not isinstance(out, bool),
           f"{what}: return a number (an int), got {type(out).__name__}")
    expect(math.isfinite(out) and float(out) == int(out),
           f"{what}: a parameter count is a whole number, got {out!r}")
    return int(out)


def _describe(d: int, f: int, n: int, k: int, activation: str, shared: int) -> str:
    return f"d_model={d}, d_hidden={f}, num_experts={n}, k={k}, activation={activation!r}, num_shared={shared}"


def _active_cases(student_fn, cases: list[tuple]) -> None:
    """Run every case first, then name the mistake that explains ALL the wrong answers.

    Single cases can be ambiguous (with d_model = d_hidden, k = 2 and one shared expert,
    "SwiGLU has two matrices" and "forgot the shared expert" give the same number); a mistake
    is systematic, so the variant that matches every case is the one the student made.
    """
    results = []
    for args in cases:
        got = _as_int(student_fn(*args), _describe(*args))
        results.append((args, got, _reference_active(*args)))
    wrong = [(args, got, ref) for args, got, ref in results if got != ref]
    if not wrong:
        return
    args, got, ref = wrong[0]
    what = f"{_describe(*args)}: got {got:,}, expected {ref:,}"
    variants = [_active_variants(*a) for a, _, _ in results]
    for name in _ACTIVE_HINTS:
        if all(v[name] == g for v, (_, g, _) in zip(variants, results)):
            raise CheckFailed(f"{what}. {_ACTIVE_HINTS[name]}")
    for name, value in _active_variants(*args).items():
        if value != ref and got == value:
            raise CheckFailed(f"{what}. {_ACTIVE_HINTS[name]}")
    raise CheckFailed(f"{what}. Count the router (d_model * num_experts) plus (k + num_shared) experts of "
                      "c * d_model * d_hidden weights each (c = 3 for SwiGLU, 2 for GELU)")


@checker("Exercise 3.1: active_params_per_token")
def check_active_params_per_token(student_fn) -> None:
    """``active_params_per_token(d_model, d_hidden, num_experts, k, activation, num_shared) -> int``."""
    _active_cases(student_fn, [
        (4, 8, 4, 1, "gelu", 0),  # by hand: router 4*4 = 16, one expert 2*4*8 = 64 -> 80
        # the course's zoo LM layer (d = f = 96, 8 SwiGLU experts, top-2) and variations of it
        (96, 96, 8, 2, "swiglu", 0), (96, 96, 8, 2, "gelu", 0), (96, 96, 8, 2, "swiglu", 1),
        (64, 256, 16, 4, "gelu", 2), (128, 32, 64, 6, "swiglu", 0), (512, 1024, 8, 8, "swiglu", 0),
        (8, 24, 3, 3, "gelu", 1),
    ])
    # Agreement with a real layer of the package, as chapter 3 measures it.
    for d, f, n, k, act, s in ((40, 32, 8, 2, "swiglu", 1), (24, 48, 6, 1, "gelu", 0)):
        layer = SparseMoE(d, n, f, k=k, num_shared_experts=s, activation=act)
        ref = layer.active_params_per_token()
        got = _as_int(student_fn(d, f, n, k, act, s), "SparseMoE layer")
        expect(got == ref, f"for SparseMoE(d_model={d}, num_experts={n}, d_hidden={f}, k={k}, num_shared_experts={s}, "
                           f"activation={act!r}) the package counts {ref:,} active parameters per token, you {got:,}")


# --------------------------------------------------------------------------------------------
# Exercise 3.2: expert frequency from a routing tensor
# --------------------------------------------------------------------------------------------
def _reference_frequency(indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1).cpu(), minlength=n).double() / indices.numel()


def _frequency_case(student_fn, indices: torch.Tensor, n: int, what: str) -> None:
    t, k = indices.shape
    ref = _reference_frequency(indices, n)
    out = student_fn(indices.clone(), n)
    expect(torch.is_tensor(out), f"{what}: expert_frequency must return a torch tensor, got {type(out).__name__}")
    if out.dim() == 2 and tuple(out.shape) == (k, n):
        raise CheckFailed(f"{what}: got shape {tuple(out.shape)}, expected ({n},): you counted per routing slot; "
                          "count over all T*k assignments (flatten the indices first)")
    if out.dim() == 2 and tuple(out.shape) == (t, n):
        raise CheckFailed(f"{what}: got shape {tuple(out.shape)}, expected ({n},): that is a per-token one-hot; "
                          "sum it over the tokens (or use torch.bincount on the flattened indices)")
    if out.dim() == 1 and out.numel() < n:
        raise CheckFailed(f"{what}: got {out.numel()} values but there are num_experts={n} experts. Experts that "
                          f"received no token must still appear, with frequency 0: use torch.bincount(..., minlength="
                          "num_experts)")
    expect(out.dim() == 1 and out.numel() == n, f"{what}: expected a vector of shape ({n},), got {tuple(out.shape)}")
    expect(out.is_floating_point(), f"{what}: expected floating-point frequencies, got dtype {out.dtype}: "
                                     "convert the counts with .float() before dividing")
    got = out.detach().double().cpu()
    if torch.allclose(got, ref, rtol=1e-5, atol=1e-7):
        return
    counts = torch.bincount(indices.reshape(-1).cpu(), minlength=n).double()
    total = float(got.sum())
    if torch.allclose(got, counts):
        raise CheckFailed(f"{what}: these are the raw counts; divide by the number of assignments T*k = {t * k} "
                          "so that the frequencies sum to 1")
    if k > 1 and torch.allclose(got, counts / t, rtol=1e-5, atol=1e-7):
        raise CheckFailed(f"{what}: your frequencies sum to {total:.3g} = k, not 1: you divided by the number of "
                          f"tokens T = {t}; there are T*k = {t * k} assignments (each token picks k experts)")
    first = torch.bincount(indices[:, 0].cpu(), minlength=n).double() / t
    if k > 1 and torch.allclose(got, first, rtol=1e-5, atol=1e-7):
        raise CheckFailed(f"{what}: only each token's FIRST choice is counted; all k choices are assignments")
    raise CheckFailed(f"{what}: the frequencies differ from the reference (sum {total:.4g}, expected 1). Count how "
                      "often each expert appears among all T*k entries of indices and divide by T*k")


@checker("Exercise 3.2: expert_frequency")
def check_expert_frequency(student_fn) -> None:
    """``expert_frequency(indices [T, k], num_experts) -> [num_experts]`` summing to 1."""
    # Hand-made: 3 tokens, top-2 over 4 experts -> expert 0: 3, expert 1: 2, expert 2: 1, expert 3: 0.
    _frequency_case(student_fn, torch.tensor([[0, 1], [1, 0], [0, 2]]), 4, "the 3-token example")
    # Random routing of several shapes, skewed so that the frequencies differ.
    for t, e, k in ((64, 8, 2), (100, 4, 1), (50, 16, 4), (9, 6, 6)):
        indices = (torch.randn(t, e) + torch.linspace(0, 2.0, e)).topk(k, dim=-1).indices
        _frequency_case(student_fn, indices, e, f"random routing (T={t}, num_experts={e}, k={k})")
    # The last experts are never chosen: their zeros must still be there.
    _frequency_case(student_fn, torch.randint(0, 3, (40, 2)), 8, "routing that never picks experts 3..7")
    _frequency_case(student_fn, torch.zeros(5, 1, dtype=torch.long), 4, "every token on expert 0")
    # A single token.
    _frequency_case(student_fn, torch.tensor([[3, 1]]), 5, "a single token")


# --------------------------------------------------------------------------------------------
# Exercise 3.3: perplexity of a language model on a batch
# --------------------------------------------------------------------------------------------
def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log p(target)`` per position, float64, shape of ``targets``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _reference_perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    return math.exp(float(_token_nll(logits[:, :-1], input_ids[:, 1:]).mean()))


def _perplexity_variants(logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """The usual wrong answers (as floats; inf where they overflow)."""
    def exp(x: float) -> float:
        return math.exp(x) if x < 700 else math.inf

    nll = _token_nll(logits[:, :-1], ids[:, 1:])
    out = {
        "no_shift": exp(float(_token_nll(logits, ids).mean())),
        "shift_backwards": exp(float(_token_nll(logits[:, 1:], ids[:, :-1]).mean())),
        "sum": exp(float(nll.sum())),
        "base2_exp": exp(float(nll.mean()) / math.log(2)),
        "base2_pow": 2.0 ** float(nll.mean()),
        "bits": float(nll.mean()) / math.log(2),
        "loss": float(nll.mean()),
        "mean_of_seq_ppl": float(nll.mean(dim=1).exp().mean()),
        "mean_of_token_ppl": float(nll.exp().mean()),
    }
    v = logits.shape[-1]
    if logits.shape[1] - 1 == v:  # F.cross_entropy on [B, T, V] treats dim 1 (T) as the classes
        wrong = F.cross_entropy(logits[:, :-1].double(), ids[:, 1:], reduction="mean")
        out["class_dim"] = exp(float(wrong))
    return out


_PPL_HINTS = {
    "no_shift": "the logits at position t predict the NEXT token: compare logits[:, :-1] with input_ids[:, 1:] "
                "(you compared each position with its own token)",
    "shift_backwards": "the shift goes the wrong way: position t's logits predict token t+1, so use "
                       "logits[:, :-1] with input_ids[:, 1:]",
    "sum": "you took exp of the SUMMED loss: perplexity is exp of the MEAN cross-entropy per predicted token",
    "base2_exp": "mixed log bases: the cross-entropy is in nats (natural log), so perplexity is exp(mean loss); "
                 "dividing by ln 2 gives bits, and then the inverse is 2 ** bits",
    "base2_pow": "mixed log bases: torch's cross-entropy is in nats, so perplexity is exp(mean loss), not 2 ** (mean loss)",
    "bits": "that is the cross-entropy in bits per token; perplexity is exp of the mean cross-entropy in nats",
    "loss": "that is the mean cross-entropy (the loss); perplexity is its exponential, exp(mean loss)",
    "mean_of_seq_ppl": "you averaged per-sequence perplexities; perplexity is exp of the mean loss over ALL "
                       "predicted tokens (average first, exponentiate once)",
    "mean_of_token_ppl": "you averaged exp(loss) of every token; exponentiate once, after averaging the loss",
    "class_dim": "F.cross_entropy wants the classes on dim 1: flatten to logits.reshape(-1, V) and targets.reshape(-1)",
}


def _perplexity_case(student_fn, logits: torch.Tensor, ids: torch.Tensor, what: str) -> None:
    ref = _reference_perplexity(logits, ids)
    try:
        out = student_fn(logits.clone(), ids.clone())
    except NotImplementedError:
        raise
    except RuntimeError as err:
        if "target" in str(err).lower() or "size" in str(err).lower() or "shape" in str(err).lower():
            raise CheckFailed(f"{what}: your code raised RuntimeError: {err}. Shapes: logits are [B, T, V] and "
                              "input_ids [B, T]; after the shift F.cross_entropy wants logits.reshape(-1, V) and "
                              "targets.reshape(-1) (classes on dim 1)") from None
        raise
    if torch.is_tensor(out):
        expect(out.numel() == 1, f"{what}: return one number, got a tensor of shape {tuple(out.shape)}: "
                                 "average over every predicted token of every sequence")
        out = out.item()
    expect(isinstance(out, numbers.Real) and not isinstance(out, bool),
           f"{what}: return a number (float or 0-d tensor), got {type(out).__name__}")
    got = float(out)
    if math.isfinite(got) and math.isclose(got, ref, rel_tol=1e-4, abs_tol=1e-6):
        return
    if not math.isfinite(got):
        variants = _perplexity_variants(logits, ids)
        if math.isinf(variants["sum"]) and math.isinf(got):
            raise CheckFailed(f"{what}: got {got}, expected {ref:.4f}. {_PPL_HINTS['sum']}")
        raise CheckFailed(f"{what}: got {got}, expected {ref:.4f}: inf/nan for large logits. Use log_softmax or "
                          "F.cross_entropy (they subtract the max) instead of log(softmax(...))")
    for name, value in _perplexity_variants(logits, ids).items():
        if math.isfinite(value) and not math.isclose(value, ref, rel_tol=1e-6) \
                and math.isclose(got, value, rel_tol=1e-3, abs_tol=1e-6):
            raise CheckFailed(f"{what}: got {got:.4f}, expected {ref:.4f}. {_PPL_HINTS[name]}")
    raise CheckFailed(f"{what}: got {got:.4f}, expected {ref:.4f}. Perplexity = exp(mean over all predicted tokens of "
                      "-log p(next token)), with logits[:, :-1] predicting input_ids[:, 1:]")


@checker("Exercise 3.3: perplexity")
def check_perplexity(student_fn) -> None:
    """``perplexity(logits [B, T, V], input_ids [B, T]) -> float``: ``exp`` of the mean next-token cross-entropy."""
    # A model that knows nothing (uniform logits) has perplexity V, whatever the text.
    ids = torch.randint(0, 11, (2, 9))
    _perplexity_case(student_fn, torch.zeros(2, 9, 11), ids, "uniform logits over V=11 (expected perplexity 11)")
    # A model that is always sure and right has perplexity 1.
    ids = torch.randint(0, 5, (3, 7))
    logits = torch.full((3, 7, 5), -10.0)
    logits[:, :-1] = logits[:, :-1].scatter(-1, ids[:, 1:].unsqueeze(-1), 10.0)
    _perplexity_case(student_fn, logits, ids, "confident, correct predictions (expected perplexity about 1)")
    # Random logits, several shapes (sequences of different difficulty, so means and exps differ).
    for b, t, v in ((4, 16, 65), (1, 33, 7), (8, 5, 30), (3, 2, 4)):
        logits = torch.randn(b, t, v) * torch.linspace(0.5, 3.0, b).view(b, 1, 1)
        ids = torch.randint(0, v, (b, t))
        _perplexity_case(student_fn, logits, ids, f"random logits (B={b}, T={t}, V={v})")
    # T - 1 == V: a cross-entropy over the wrong axis runs silently here.
    logits, ids = torch.randn(2, 9, 8) * 2, torch.randint(0, 8, (2, 9))
    _perplexity_case(student_fn, logits, ids, "B=2, T=9, V=8")
    # Large logits: exp overflows in log(softmax(.)) written by hand; log_softmax subtracts the max.
    logits, ids = torch.randn(2, 12, 20) * 2.0 + 1000.0, torch.randint(0, 20, (2, 12))
    _perplexity_case(student_fn, logits, ids, "large logits (all near 1000)")


# --------------------------------------------------------------------------------------------
# Exercise 3.4 (use it): the load CV of every MoE layer of the digits-moe zoo model
# --------------------------------------------------------------------------------------------
_DIGITS: dict = {}


def digits_routing() -> list[torch.Tensor]:
    """``indices [T, k]`` of every MoE layer of ``digits-moe`` on its held-out images (all tokens)."""
    if not _DIGITS:
        from moe_course import metrics, zoo  # trains the model on first use, then loads it from the cache

        model = zoo.pretrained("digits-moe", progress=False)
        split = zoo.data("digits-moe")["validation"]
        n = len(split) * model.config.num_tokens
        stats = metrics.routing_stats(model, split, batch_size=512, max_tokens=n, device="cpu")
        _DIGITS["indices"] = [s.indices.cpu().clone() for s in stats]
        _DIGITS["load_cv"] = [float(s.load_cv) for s in stats]
        _DIGITS["num_experts"] = stats[0].num_experts
    return _DIGITS["indices"]


def _counts(indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(indices.reshape(-1), minlength=n).double()


def _reference_cv(indices: torch.Tensor, n: int) -> float:
    c = _counts(indices, n)
    return float(c.std(unbiased=False) / c.mean())


def _cv_variants(indices: torch.Tensor, n: int) -> dict[str, float]:
    c = _counts(indices, n)
    f = c / c.sum()
    present = c[c > 0]
    first = _counts(indices[:, :1], n)
    h = float(-(f[f > 0] * f[f > 0].log()).sum())
    return {
        "sample_std": float(c.std(unbiased=True) / c.mean()),
        "no_mean": float(f.std(unbiased=False)),
        "no_mean_counts": float(c.std(unbiased=False)),
        "variance": float(c.var(unbiased=False) / c.mean() ** 2),
        "present_only": float(present.std(unbiased=False) / present.mean()),
        "first_choice": float(first.std(unbiased=False) / first.mean()),
        "entropy": h,
        "normalized_entropy": h / math.log(n),
        "max_over_mean": float(c.max() / c.mean()),
    }


_CV_HINTS = {
    "sample_std": "you used the sample standard deviation (divides by N - 1); the CV of a load uses the "
                  "population std over the N experts: torch.std(..., unbiased=False) or correction=0",
    "no_mean": "that is the std of the frequencies; the coefficient of variation divides the std by the mean",
    "no_mean_counts": "that is the std of the counts; the coefficient of variation divides the std by the mean",
    "variance": "that is the squared CV (variance / mean**2); take the standard deviation, not the variance",
    "present_only": "an expert nobody chose still counts (with 0 tokens): compute the frequencies over all "
                    "num_experts experts (bincount with minlength=num_experts)",
    "first_choice": "you counted only the first choice of every token; with top-k routing all k columns of "
                    "indices are assignments",
    "entropy": "that is the entropy of the frequencies; the question asks for the coefficient of variation "
               "std / mean",
    "normalized_entropy": "that is the normalised entropy H / log N; the question asks for the coefficient of "
                          "variation std / mean",
    "max_over_mean": "that is the max / mean load; the coefficient of variation is std / mean",
}


def _cv_case(student_fn, indices: torch.Tensor, n: int, what: str, tol: float = 1e-5) -> float:
    ref = _reference_cv(indices, n)
    out = student_fn(indices.clone(), n)
    if torch.is_tensor(out):
        expect(out.numel() == 1, f"{what}: return one number, got a tensor of shape {tuple(out.shape)}")
        out = out.item()
    expect(isinstance(out, numbers.Real) and not isinstance(out, bool),
           f"{what}: return a number (float or 0-d tensor), got {type(out).__name__}")
    got = float(out)
    if math.isfinite(got) and abs(got - ref) <= tol * max(1.0, abs(ref)):
        return got
    for name, value in _cv_variants(indices, n).items():
        if math.isfinite(value) and abs(value - ref) > 1e-9 and abs(got - value) <= 1e-6 * max(1.0, abs(value)):
            raise CheckFailed(f"{what}: got {got:.5f}, expected {ref:.5f}. {_CV_HINTS[name]}")
    raise CheckFailed(f"{what}: got {got:.5f}, expected {ref:.5f}. CV = std / mean of the load over all "
                      "num_experts experts (population std), from the frequencies of all T*k assignments")


@checker("Exercise 3.4: load_cv on the digits-moe model", timeout=180)
def check_load_cv(student_fn) -> None:
    """``load_cv(indices [T, k], num_experts) -> float``: std / mean (population std) of the load of
    every expert; on synthetic routing, then on every MoE layer of ``digits-moe`` (its held-out images)."""
    g = torch.Generator().manual_seed(3)
    _cv_case(student_fn, torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 2]]), 4, "a hand-made routing of 5 tokens")
    _cv_case(student_fn, torch.tensor([[0, 1], [1, 0], [0, 1]]), 4, "experts 2 and 3 never chosen")
    for t, n, k in ((50, 8, 2), (200, 16, 1), (64, 6, 3)):
        probs = torch.linspace(1.0, 3.0, n)
        idx = torch.stack([torch.multinomial(probs, k, generator=g) for _ in range(t)])
        _cv_case(student_fn, idx, n, f"random routing (T={t}, N={n}, k={k})")
    layers = digits_routing()
    n = _DIGITS["num_experts"]
    got = [_cv_case(student_fn, idx, n, f"digits-moe layer {i} ({len(idx):,} tokens)", tol=1e-4)
           for i, idx in enumerate(layers)]
    worst = max(range(len(got)), key=got.__getitem__)
    print("digits-moe on its held-out images: " + ", ".join(f"layer {i}: CV {v:.4f}" for i, v in enumerate(got))
          + f"; the least balanced layer is layer {worst} (CV {got[worst]:.4f})")
