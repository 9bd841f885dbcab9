"""Chapter 7: truncated SVD factors, the rank that keeps a fraction of the energy."""

from __future__ import annotations

import torch

from . import Chapter

M = Chapter("ch07")


# ------------------------------------------------------------------ 7.1 svd_factors
@M.right("check_svd_factors")
def svd_with_diag(w, rank):
    """Full matrices, diag(sqrt(S)) multiplied on each side."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=True)
    root = torch.diag(S[:rank].sqrt())
    return U[:, :rank] @ root, root @ Vh[:rank, :]


@M.wrong("check_svd_factors", "smallest")
def svd_smallest(w, rank):
    """The last r singular values."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[-rank:].sqrt()
    return U[:, -rank:] * root, root[:, None] * Vh[-rank:]


@M.wrong("check_svd_factors", "wrong transpose")
def svd_columns_of_vh(w, rank):
    """Vh transposed again: R built from the columns of Vh (torch.svd's V mistaken for V^T)."""
    U, S, V = torch.svd(w)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * V[:rank]


@M.wrong("check_svd_factors", "sigma is not split")
def svd_all_sigma_left(w, rank):
    """L = U_r S_r, R = Vh_r."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


@M.wrong("check_svd_factors", "twice")
def svd_no_square_root(w, rank):
    """S (not its square root) in both factors."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U[:, :rank] * S[:rank], S[:rank, None] * Vh[:rank]


@M.wrong("check_svd_factors", "l must have shape")
def svd_returns_r_then_l(w, rank):
    """(R, L) returned in the wrong order."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root


@M.wrong("check_svd_factors", "l must have shape")
def svd_one_rank_too_many(w, rank):
    """rank + 1 singular values kept."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[:rank + 1].sqrt()
    return U[:, :rank + 1] * root, root[:, None] * Vh[:rank + 1]


@M.wrong("check_svd_factors", "transposes")
def svd_r_transposed(w, rank):
    """R returned as [n, r] (V_r S^(1/2), not its transpose)."""
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, Vh[:rank].T * root


# ------------------------------------------------------------------ 7.2 rank_for_energy
@M.right("check_rank_for_energy")
def rank_searchsorted(singular_values, energy):
    """searchsorted on the cumulative energy (first index with cum >= energy, as a count)."""
    e = singular_values.double() ** 2
    cum = e.cumsum(0) / e.sum()
    r = int(torch.searchsorted(cum, torch.tensor([energy - 1e-12], dtype=torch.float64)).item()) + 1
    return max(1, min(r, singular_values.numel()))


@M.right("check_rank_for_energy")
def rank_loop(singular_values, energy):
    """A loop over the squared values in Python floats."""
    sq = [float(s) ** 2 for s in singular_values]
    total, acc = sum(sq), 0.0
    for r, v in enumerate(sq, start=1):
        acc += v
        if acc >= energy * total - 1e-12 * total:
            return r
    return len(sq)


def _frac(singular_values, square=True):
    e = singular_values.double()
    e = e ** 2 if square else e
    return e.cumsum(0) / e.sum()


@M.wrong("check_rank_for_energy", "squared")
def rank_on_sigma(singular_values, energy):
    """Energy measured on sigma, not sigma^2."""
    return min(int((_frac(singular_values, square=False) < energy - 1e-9).sum()) + 1, singular_values.numel())


@M.wrong("check_rank_for_energy", "off by one")
def rank_index_not_count(singular_values, energy):
    """The index of the first r, not the count."""
    return max(int((_frac(singular_values) < energy - 1e-9).sum()), 0)


@M.wrong("check_rank_for_energy", ">=, not >")
def rank_strict(singular_values, energy):
    """Cumulative energy strictly greater than the target."""
    return min(int((_frac(singular_values) <= energy).sum()) + 1, singular_values.numel())


@M.wrong("check_rank_for_energy", ">=, not >")
def rank_searchsorted_right(singular_values, energy):
    """searchsorted(..., right=True): strictly greater."""
    cum = _frac(singular_values)
    r = int(torch.searchsorted(cum, torch.tensor([energy], dtype=torch.float64), right=True).item()) + 1
    return min(r, singular_values.numel())


@M.wrong("check_rank_for_energy", "int")
def rank_float(singular_values, energy):
    """The rank as a fractional float (an interpolated crossing point)."""
    cum = _frac(singular_values)
    r = int((cum < energy - 1e-9).sum())
    prev = float(cum[r - 1]) if r > 0 else 0.0
    return min(r + (energy - prev) / (float(cum[r]) - prev + 1e-30), float(singular_values.numel()))


@M.wrong("check_rank_for_energy", "ascending")
def rank_assumes_ascending(singular_values, energy):
    """Sorts the values ascending first (accumulates the smallest first)."""
    return min(int((_frac(singular_values.sort().values) < energy - 1e-9).sum()) + 1, singular_values.numel())
