"""Chapter 3: active parameters per token, expert frequency, perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import Chapter

M = Chapter("ch03")


# ------------------------------------------------------------------ 3.1 active_params_per_token
@M.right("check_active_params_per_token")
def active_by_parts(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """Counted part by part."""
    expert = d_model * d_hidden * 2 + (d_model * d_hidden if activation == "swiglu" else 0)
    return d_model * num_experts + k * expert + num_shared * expert


def _c(activation):
    return 3 if activation == "swiglu" else 2


@M.wrong("check_active_params_per_token", "all num_experts experts")
def active_all_experts(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """Every expert counted."""
    return d_model * num_experts + (num_experts + num_shared) * _c(activation) * d_model * d_hidden


@M.wrong("check_active_params_per_token", "router is missing")
def active_no_router(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """No router."""
    return (k + num_shared) * _c(activation) * d_model * d_hidden


@M.wrong("check_active_params_per_token", "three matrices")
def active_swiglu_two(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """SwiGLU counted with two matrices."""
    return d_model * num_experts + (k + num_shared) * 2 * d_model * d_hidden


@M.wrong("check_active_params_per_token", "shared experts are missing")
def active_no_shared(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """The shared experts forgotten."""
    return d_model * num_experts + k * _c(activation) * d_model * d_hidden


@M.wrong("check_active_params_per_token", "not d_model * k")
def active_router_k(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """The router counted as d_model * k."""
    return d_model * k + (k + num_shared) * _c(activation) * d_model * d_hidden


@M.wrong("check_active_params_per_token", "flops")
def active_flops(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """2 x (FLOPs, not parameters)."""
    return 2 * (d_model * num_experts + (k + num_shared) * _c(activation) * d_model * d_hidden)


@M.wrong("check_active_params_per_token", "not one d_model * d_hidden matrix")
def active_one_matrix(d_model, d_hidden, num_experts, k, activation="gelu", num_shared=0):
    """One matrix per expert."""
    return d_model * num_experts + (k + num_shared) * d_model * d_hidden


# ------------------------------------------------------------------ 3.2 expert_frequency
@M.right("check_expert_frequency")
def frequency_one_hot(indices, num_experts):
    """Mean of one-hot vectors over tokens and choices."""
    return F.one_hot(indices, num_experts).float().mean(dim=(0, 1))


@M.wrong("check_expert_frequency", "raw counts")
def frequency_counts(indices, num_experts):
    """Counts, not divided."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts).float()


@M.wrong("check_expert_frequency", "number of tokens")
def frequency_over_t(indices, num_experts):
    """Divided by T."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts).float() / indices.shape[0]


@M.wrong("check_expert_frequency", "first choice")
def frequency_first_choice(indices, num_experts):
    """Only the first choice counted."""
    return torch.bincount(indices[:, 0], minlength=num_experts).float() / indices.shape[0]


@M.wrong("check_expert_frequency", "minlength")
def frequency_no_minlength(indices, num_experts):
    """bincount without minlength."""
    return torch.bincount(indices.reshape(-1)).float() / indices.numel()


@M.wrong("check_expert_frequency", "per routing slot")
def frequency_per_slot(indices, num_experts):
    """One histogram per choice column."""
    return F.one_hot(indices, num_experts).float().mean(0)


@M.wrong("check_expert_frequency", "floating-point")
def frequency_integer_division(indices, num_experts):
    """Integer division of the counts."""
    return torch.bincount(indices.reshape(-1), minlength=num_experts) // indices.numel()


@M.wrong("check_expert_frequency", "per-token one-hot")
def frequency_one_hot_per_token(indices, num_experts):
    """The per-token one-hot, not reduced over tokens."""
    return F.one_hot(indices, num_experts).float().sum(1) / indices.shape[1]


# ------------------------------------------------------------------ 3.3 perplexity
@M.right("check_perplexity")
def perplexity_manual(logits, input_ids):
    """log_softmax and gather by hand; returns a Python float."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


def _ce(logits, ids, **kw):
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v).float(), ids.reshape(-1), **kw)


@M.wrong("check_perplexity", "next token")
def ppl_no_shift(logits, input_ids):
    """No shift."""
    return torch.exp(_ce(logits, input_ids))


@M.wrong("check_perplexity", "wrong way")
def ppl_shift_backwards(logits, input_ids):
    """Shifted the wrong way."""
    return torch.exp(_ce(logits[:, 1:], input_ids[:, :-1]))


@M.wrong("check_perplexity", "summed loss")
def ppl_of_sum(logits, input_ids):
    """exp of the summed loss."""
    return torch.exp(_ce(logits[:, :-1], input_ids[:, 1:], reduction="sum"))


@M.wrong("check_perplexity", "2 ** (mean loss)")
def ppl_base_two(logits, input_ids):
    """2 ** loss."""
    return 2 ** _ce(logits[:, :-1], input_ids[:, 1:])


@M.wrong("check_perplexity", "mean cross-entropy (the loss)")
def ppl_is_loss(logits, input_ids):
    """The loss itself."""
    return _ce(logits[:, :-1], input_ids[:, 1:])


@M.wrong("check_perplexity", "per-sequence")
def ppl_mean_of_sequences(logits, input_ids):
    """Mean of per-sequence perplexities."""
    return torch.stack([torch.exp(_ce(logits[b:b + 1, :-1], input_ids[b:b + 1, 1:]))
                        for b in range(logits.shape[0])]).mean()


@M.wrong("check_perplexity", "exponentiate once")
def ppl_mean_of_tokens(logits, input_ids):
    """Mean of exp(per-token loss)."""
    return torch.exp(_ce(logits[:, :-1], input_ids[:, 1:], reduction="none")).mean()


@M.wrong("check_perplexity", "inf/nan")
def ppl_log_of_softmax(logits, input_ids):
    """log(softmax) written by hand, with exp overflowing."""
    e = logits[:, :-1].exp()
    p = e / e.sum(-1, keepdim=True)
    nll = -p.log().gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.exp(nll.mean())


# ------------------------------------------------------------------ 3.4 load_cv (digits-moe)
def _cnt(indices, num_experts):
    return torch.bincount(indices.reshape(-1), minlength=num_experts).double()


@M.right("check_load_cv")
def cv_numpy(indices, num_experts):
    """NumPy, population std by default."""
    import numpy as np

    counts = np.bincount(indices.numpy().reshape(-1), minlength=num_experts)
    return float(counts.std() / counts.mean())


@M.wrong("check_load_cv", "sample standard deviation")
def cv_sample_std(indices, num_experts):
    """torch.std's default (N - 1)."""
    c = _cnt(indices, num_experts)
    return float(c.std() / c.mean())


@M.wrong("check_load_cv", "divides the std by the mean")
def cv_std_of_frequency(indices, num_experts):
    """Forgot to divide by the mean."""
    f = _cnt(indices, num_experts)
    f = f / f.sum()
    return float(f.std(unbiased=False))


@M.wrong("check_load_cv", "minlength")
def cv_present_experts(indices, num_experts):
    """bincount without minlength: idle experts vanish."""
    c = torch.bincount(indices.reshape(-1)).double()
    c = c[c > 0]
    return float(c.std(unbiased=False) / c.mean())


@M.wrong("check_load_cv", "all k columns")
def cv_first_choice(indices, num_experts):
    """Only the top-1 column."""
    c = _cnt(indices[:, 0], num_experts)
    return float(c.std(unbiased=False) / c.mean())


@M.wrong("check_load_cv", "variance")
def cv_squared(indices, num_experts):
    """var / mean**2."""
    c = _cnt(indices, num_experts)
    return float(c.var(unbiased=False) / c.mean() ** 2)


@M.wrong("check_load_cv", "entropy")
def cv_entropy(indices, num_experts):
    """Returned the entropy instead."""
    f = _cnt(indices, num_experts)
    f = f / f.sum()
    f = f[f > 0]
    return float(-(f * f.log()).sum())
