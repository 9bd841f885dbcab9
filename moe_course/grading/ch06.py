"""Checkers for chapter 6, knowledge distillation: the Hinton et al. (2015) KD loss and the
"fraction of the gain preserved" summary.

Each checker compares the student's function with the package's reference
(:func:`moe_course.compress.distillation.kd_loss` and
:func:`~moe_course.compress.distillation.gain_preserved`) on a hand-made case, random cases and edge
cases, and recognises the usual wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_course.compress.distillation import gain_preserved, kd_loss

from .core import CheckFailed, checker, expect

__all__ = ["check_kd_loss", "check_gain_preserved"]


def _kl(p_log, q_log):
    return F.kl_div(q_log, p_log, reduction="batchmean", log_target=True)


def _kd_variants(s, t, y, T, a):
    v = s.shape[-1]
    s2, t2 = s.reshape(-1, v).float(), t.reshape(-1, v).float()
    ls, lt = F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1)
    hard = F.cross_entropy(s2, y.reshape(-1))
    soft = _kl(lt, ls)
    out = {
        "no_t2": a * soft + (1 - a) * hard,
        "reversed": a * _kl(ls, lt) * T * T + (1 - a) * hard,
        "softmax_student": a * F.kl_div(torch.softmax(s2 / T, -1), lt.exp(), reduction="batchmean") * T * T
        + (1 - a) * hard,
        "swapped_alpha": (1 - a) * soft * T * T + a * hard,
        "no_temperature": a * _kl(F.log_softmax(t2, -1), F.log_softmax(s2, -1)) + (1 - a) * hard,
        "no_temperature_t2": a * _kl(F.log_softmax(t2, -1), F.log_softmax(s2, -1)) * T * T + (1 - a) * hard,
        "mean_reduction": a * soft * T * T / v + (1 - a) * hard,
        "sum_reduction": a * soft * T * T * s2.shape[0] + (1 - a) * hard,
        "soft_only": soft * T * T,
    }
    if s.dim() > 2:  # batchmean on unflattened [B, T, V] logits divides by B only
        lead = s2.shape[0] // s.shape[0]
        out["not_flattened"] = a * soft * T * T * lead + (1 - a) * hard
    return out


_KD_HINTS = {
    "no_t2": "the soft term must be multiplied by T**2 (Hinton et al. 2015): its gradients shrink as 1/T**2, "
             "and T**2 puts them back on the scale of the label loss",
    "reversed": "the KL direction is reversed: distillation uses KL(teacher || student) = "
                "sum p_teacher * (log p_teacher - log p_student)",
    "softmax_student": "F.kl_div expects LOG-probabilities for its first argument: pass "
                       "F.log_softmax(student_logits / T), not softmax",
    "swapped_alpha": "alpha weights the soft (teacher) term and 1 - alpha the hard (label) term",
    "no_temperature": "divide both teacher and student logits by the temperature T before the softmax",
    "no_temperature_t2": "divide both teacher and student logits by the temperature T before the softmax (the T**2 "
                         "factor alone is not the temperature)",
    "mean_reduction": "reduction='mean' divides the KL by N * V (every element), not by the N positions: use "
                      "reduction='batchmean' on the flattened [N, V] logits",
    "not_flattened": "flatten the logits to [N, V] first: reduction='batchmean' on [B, T, V] divides by B only, "
                     "not by the B * T positions",
    "sum_reduction": "average the KL over positions (reduction='batchmean' on [N, V] logits), do not sum it",
    "soft_only": "mix in the label loss: alpha * soft + (1 - alpha) * cross_entropy(student_logits, labels)",
}


def _diagnose_kd(out, s, t, y, T, a) -> str:
    for name, v in _kd_variants(s, t, y, T, a).items():
        if torch.allclose(out.float(), v.float(), rtol=1e-4, atol=1e-6):
            return _KD_HINTS[name]
    return ("compare with alpha * T**2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), "
            "with the KL and CE averaged over positions")


@checker("Exercise 6.1: the knowledge-distillation loss")
def check_kd_loss(kd) -> None:
    g = torch.Generator().manual_seed(0)
    hand_s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
    hand_t = torch.tensor([[3.0, 0.0, -2.0], [-1.0, 2.0, 1.0]])
    cases = [(hand_s, hand_t, torch.tensor([0, 1]), 2.0, 0.5)]
    cases.append((torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 3,
                  torch.randint(0, 10, (8,), generator=g), 4.0, 0.7))
    cases.append((torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g) * 2,
                  torch.randint(0, 7, (2, 5), generator=g), 3.0, 0.9))  # LM logits [B, T, V]
    cases.append((torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), torch.randint(0, 6, (4,), generator=g),
                  1.0, 0.3))
    for s, t, y, T, a in cases:
        desc = f"(logits of shape {tuple(s.shape)}, temperature={T}, alpha={a})"
        out = kd(s.clone(), t.clone(), y.clone(), T, a)
        if not torch.is_tensor(out):
            raise CheckFailed(f"return a scalar tensor, got {type(out).__name__} {desc}")
        expect(out.numel() == 1, f"return a scalar (one number), got shape {tuple(out.shape)} {desc}")
        ref = kd_loss(s, t, y, T, a)
        if not torch.allclose(out.reshape(()).float(), ref, rtol=1e-4, atol=1e-6):
            raise CheckFailed(f"{_diagnose_kd(out.reshape(()), s, t, y, T, a)} {desc}")
    s = torch.randn(5, 4, generator=g, requires_grad=True)
    out = kd(s, torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g), 2.0, 0.5)
    expect(out.requires_grad, "the loss must stay differentiable w.r.t. student_logits (no .detach() or .item())")
    same = torch.randn(3, 5, generator=g)
    out = kd(same.clone(), same.clone(), torch.zeros(3, dtype=torch.long), 2.0, 1.0)
    expect(abs(float(out)) < 1e-5, f"a student equal to the teacher with alpha=1 must have loss 0, got {float(out):.4g}")


@checker("Exercise 6.2: fraction of the teacher's gain preserved")
def check_gain_preserved(fn) -> None:
    cases = [(0.96, 0.95, 0.98), (10.0, 11.5, 6.8), (2.3, 2.4, 1.9), (0.95, 0.95, 0.98), (0.94, 0.95, 0.98),
             (0.98, 0.95, 0.98), (0.99, 0.95, 0.98)]
    for s, b, t in cases:
        desc = f"(student={s}, baseline={b}, teacher={t})"
        try:
            out = fn(s, b, t)
        except ValueError as err:
            lower = " (lower is better here: a loss or perplexity)" if t < b else ""
            raise CheckFailed(f"you raised ValueError ({err}) although teacher != baseline{lower}: the same formula "
                              f"works when lower is better, where both differences are negative; raise only when "
                              f"teacher == baseline {desc}") from None
        try:
            out = float(out)
        except (TypeError, ValueError):
            raise CheckFailed(f"return a number, got {type(out).__name__} {desc}") from None
        ref = gain_preserved(s, b, t)
        if abs(out - ref) > 1e-6:
            if abs(out - 100 * ref) < 1e-4:
                raise CheckFailed(f"return a fraction (1.0 = all the gain), not a percentage {desc}")
            if abs(out - (t - s) / (t - b)) < 1e-6:
                raise CheckFailed(f"that is the fraction of the gain LOST: measure from the baseline, "
                                  f"(student - baseline) / (teacher - baseline) {desc}")
            if t != s and abs(out - (s - b) / (t - s)) < 1e-6:
                raise CheckFailed(f"divide by the whole gap teacher - baseline, not teacher - student {desc}")
            if abs(out - abs(ref)) < 1e-6:
                raise CheckFailed(f"keep the sign: a student worse than the baseline has a negative fraction {desc}")
            if abs(out - (s - b) / abs(t - b)) < 1e-6:
                raise CheckFailed(f"do not take abs() of teacher - baseline: when lower is better (a loss) both "
                                  f"differences are negative and their ratio is the right, positive fraction {desc}")
            if abs(out - min(max(ref, 0.0), 1.0)) < 1e-6:
                raise CheckFailed(f"do not clip the fraction: values outside [0, 1] are meaningful (below 0: "
                                  f"distillation hurt; above 1: the student beat the teacher) {desc}")
            raise CheckFailed(f"expected {ref:.4g}, got {out:.4g} {desc}")
    try:
        fn(1.0, 2.0, 2.0)
    except ValueError:
        pass
    except ZeroDivisionError:
        raise CheckFailed("teacher == baseline divides by zero: raise a ValueError that says there is no gain") from None
    else:
        raise CheckFailed("teacher == baseline leaves no gain to preserve: raise a ValueError")
