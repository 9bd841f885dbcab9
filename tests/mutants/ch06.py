"""Chapter 6: the distillation loss, the fraction of the teacher's gain preserved."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch06")


# ------------------------------------------------------------------ 6.1 kd
def _flat(student_logits, teacher_logits, labels):
    v = student_logits.shape[-1]
    return student_logits.reshape(-1, v), teacher_logits.detach().reshape(-1, v), labels.reshape(-1)


@M.right("check_kd_loss")
def kd_by_hand(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """KL written out as sum p (log p - log q), mean over positions."""
    s, t, y = _flat(student_logits, teacher_logits, labels)
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(s, y)


def _kd(s, t, y, T, a, *, t2=True, reduction="batchmean", flatten=True, student_fn=F.log_softmax, swap_alpha=False,
        reverse=False, temp=True):
    if flatten:
        s, t, y = _flat(s, t, y)
    ts = T if temp else 1.0
    log_q = F.log_softmax(s / ts, -1)
    log_p = F.log_softmax(t / ts, -1)
    if reverse:
        soft = F.kl_div(log_p, log_q, reduction=reduction, log_target=True)
    elif student_fn is F.log_softmax:
        soft = F.kl_div(log_q, log_p, reduction=reduction, log_target=True)
    else:
        soft = F.kl_div(torch.softmax(s / ts, -1), log_p.exp(), reduction=reduction)
    if t2:
        soft = soft * T ** 2
    hard = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
    a_soft, a_hard = (1 - a, a) if swap_alpha else (a, 1 - a)
    return a_soft * soft + a_hard * hard


@M.wrong("check_kd_loss", "t**2")
def kd_no_t2(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """No T**2 factor."""
    return _kd(student_logits, teacher_logits, labels, temperature, alpha, t2=False)


@M.wrong("check_kd_loss", "direction is reversed")
def kd_reversed(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """KL(student || teacher)."""
    return _kd(student_logits, teacher_logits, labels, temperature, alpha, reverse=True)


@M.wrong("check_kd_loss", "log-probabilities")
def kd_softmax_student(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """F.kl_div fed probabilities, not log-probabilities."""
    return _kd(student_logits, teacher_logits, labels, temperature, alpha, student_fn=torch.softmax)


@M.wrong("check_kd_loss", "alpha weights the soft")
def kd_swapped_alpha(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """alpha on the label term."""
    return _kd(student_logits, teacher_logits, labels, temperature, alpha, swap_alpha=True)


@M.wrong("check_kd_loss", "divide both")
def kd_no_temperature(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """Logits not divided by T."""
    return _kd(student_logits, teacher_logits, labels, temperature, alpha, temp=False)


@M.wrong("check_kd_loss", "batchmean")
def kd_sum_reduction(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """reduction='sum'."""
    return _kd(student_logits, teacher_logits, labels, temperature, alpha, reduction="sum")


@M.wrong("check_kd_loss", "batchmean")
def kd_mean_reduction(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """reduction='mean' (divides by N*V, not N)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that 'mean' is not the KL's definition
        return _kd(student_logits, teacher_logits, labels, temperature, alpha, reduction="mean")


@M.wrong("check_kd_loss", "flatten")
def kd_not_flattened(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """batchmean on [B, T, V] logits (divides by B, not B*T)."""
    return _kd(student_logits, teacher_logits, labels, temperature, alpha, flatten=False)


@M.wrong("check_kd_loss", "label loss")
def kd_soft_only(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """No label term."""
    s, t, _ = _flat(student_logits, teacher_logits, labels)
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="batchmean",
                    log_target=True)
    return soft * temperature ** 2


@M.wrong("check_kd_loss", "differentiable")
def kd_item(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    """Returns a new tensor from .item() (no gradient)."""
    return torch.tensor(_kd(student_logits, teacher_logits, labels, temperature, alpha).item())


# ------------------------------------------------------------------ 6.2 gain_fraction
@M.right("check_gain_preserved")
def gain_guarded_by_difference(student, baseline, teacher):
    """Checks the gap, not equality, and returns a float."""
    gap = teacher - baseline
    if gap == 0:
        raise ValueError("no gain between baseline and teacher")
    return float((student - baseline) / gap)


@M.wrong("check_gain_preserved", "percentage")
def gain_percent(student, baseline, teacher):
    """In percent."""
    if teacher == baseline:
        raise ValueError("no gain")
    return 100 * (student - baseline) / (teacher - baseline)


@M.wrong("check_gain_preserved", "lost")
def gain_lost(student, baseline, teacher):
    """The fraction lost."""
    if teacher == baseline:
        raise ValueError("no gain")
    return (teacher - student) / (teacher - baseline)


@M.wrong("check_gain_preserved", "teacher - student")
def gain_over_teacher_gap(student, baseline, teacher):
    """Divided by teacher - student."""
    if teacher == baseline:
        raise ValueError("no gain")
    return (student - baseline) / (teacher - student)


@M.wrong("check_gain_preserved", "keep the sign")
def gain_abs(student, baseline, teacher):
    """abs() of the result."""
    if teacher == baseline:
        raise ValueError("no gain")
    return abs((student - baseline) / (teacher - baseline))


@M.wrong("check_gain_preserved", "valueerror")
def gain_divides_by_zero(student, baseline, teacher):
    """No check for teacher == baseline."""
    return (student - baseline) / (teacher - baseline)


@M.wrong("check_gain_preserved", "lower is better")
def gain_abs_denominator(student, baseline, teacher):
    """abs() of the teacher's gain (wrong sign for losses, where lower is better)."""
    if teacher == baseline:
        raise ValueError("no gain")
    return (student - baseline) / abs(teacher - baseline)


@M.wrong("check_gain_preserved", "outside [0, 1]")
def gain_clipped(student, baseline, teacher):
    """Clipped to [0, 1]."""
    if teacher == baseline:
        raise ValueError("no gain")
    return min(max((student - baseline) / (teacher - baseline), 0.0), 1.0)


@M.wrong("check_gain_preserved", "lower is better")
def gain_rejects_losses(student, baseline, teacher):
    """Raises unless the teacher is HIGHER than the baseline (forgets that losses go down)."""
    if teacher <= baseline:
        raise ValueError("the teacher must beat the baseline")
    return (student - baseline) / (teacher - baseline)
