"""Auxiliary router losses (chapter 2, section "load balancing"): Switch load balancing, the
ST-MoE router z-loss, and the CV² balance measure of Shazeer et al."""

from __future__ import annotations

import torch

from moe_course import _validate

__all__ = ["load_balancing_loss", "router_z_loss", "coefficient_of_variation_sq"]


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    r"""Switch Transformer load-balancing loss (Fedus et al. 2022, eq. 4), without its alpha.

    .. math:: \mathcal{L}_{bal} = N \sum_{i=1}^{N} f_i P_i

    ``f_i`` is the fraction of the ``T*k`` top-k assignments that went to expert ``i`` (counted,
    so not differentiable) and ``P_i`` the mean *full* softmax probability of expert ``i``
    (differentiable). The value is 1 under perfectly balanced routing and ``N`` when every
    token goes to one expert with probability 1 (top-1). Multiply by alpha (1e-2) in the
    training loss; the models do that with ``aux_loss_weight``.

    Args:
        probs: ``[T, N]`` router softmax probabilities.
        indices: ``[T, k]`` chosen experts.
        num_experts: ``N``.
    """
    _check_routing(probs, indices, num_experts)
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / indices.numel()        # [N] fraction of assignments
    p = probs.mean(dim=0)               # [N] mean router probability
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    r"""Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5), without its coefficient.

    .. math:: \mathcal{L}_z = \frac{1}{T} \sum_{x} \Big(\log \sum_j e^{z_j(x)}\Big)^2

    It keeps router logits small, which keeps the softmax stable in low precision.
    Multiply by about 1e-3 in the training loss (``z_loss_weight``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape [T, num_experts], got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def coefficient_of_variation_sq(x: torch.Tensor) -> torch.Tensor:
    """CV² = (std / mean)², the balance measure of Shazeer et al. 2017 (importance and load losses)."""
    if not torch.is_tensor(x):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError("x: expected a non-empty tensor (one value per expert)")
    x = x.float()
    return x.var(unbiased=False) / (x.mean().pow(2) + 1e-10)


# argument checks, kept out of the losses above (shapes only: free, no GPU synchronisation) -----------
def _check_routing(probs: torch.Tensor, indices: torch.Tensor, num_experts: int) -> None:
    _validate.int_in("num_experts", num_experts, 1)
    if probs.dim() != 2 or probs.shape[-1] != num_experts:
        raise ValueError(f"probs: expected shape [T, num_experts={num_experts}], got {tuple(probs.shape)}")
    if indices.dim() != 2 or indices.shape[0] != probs.shape[0]:
        raise ValueError(f"indices: expected shape [T={probs.shape[0]}, k], got {tuple(indices.shape)}")
