r"""A memory roofline for MoE decoding (chapter 13, "Serving a compressed MoE").

At decode time a step processes ``B`` new tokens (one per sequence in the batch). Its arithmetic is
tiny; what it cannot avoid is reading every weight it uses from memory. For one MoE layer with
``N`` experts and top-``k`` routing, a token picks ``k`` of ``N`` experts; if the choices were
uniform and independent, an expert is missed by one token with probability ``1 - k/N`` and by all
``B`` tokens with probability ``(1 - k/N)^B``, so the expected number of *distinct* experts a step
touches is

.. math:: \mathbb{E}[\text{distinct}] = N\,\bigl(1 - (1 - k/N)^B\bigr),

which is ``k`` at ``B = 1`` and tends to ``N`` as ``B`` grows. The bytes a step must read are
that many experts' bytes per layer plus the weights every token uses (attention, router, norms),
and a memory-bound step takes

.. math:: t_\text{step} \approx \frac{\text{bytes read}}{\text{memory bandwidth}},
          \qquad t_\text{token} = t_\text{step} / B.

* :func:`expected_distinct_experts` -- the formula above.
* :func:`decode_bytes` -- bytes read by one decode step.
* :func:`predict_decode_ms` -- the roofline's time for one step.
* :func:`copy_bandwidth` -- the machine's memory bandwidth from a copy benchmark (STREAM's "copy":
  bytes read plus bytes written per second).
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["expected_distinct_experts", "decode_bytes", "predict_decode_ms", "copy_bandwidth"]


def _check_positive_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")


def expected_distinct_experts(num_experts: int, k: int, batch: int) -> float:
    """``N (1 - (1 - k/N)^B)``: expected distinct experts of one layer used by ``B`` tokens."""
    _check_positive_int("num_experts", num_experts)
    _check_positive_int("k", k)
    _check_positive_int("batch", batch)
    if k > num_experts:
        raise ValueError(f"k: expected k <= num_experts={num_experts}, got {k}")
    return num_experts * (1.0 - (1.0 - k / num_experts) ** batch)


def decode_bytes(expert_bytes: float, num_experts: int, k: int, batch: int, *, n_layers: int = 1,
                 dense_bytes: float = 0.0) -> float:
    """Bytes one decode step of ``batch`` tokens reads: ``n_layers`` MoE layers of ``expert_bytes``
    per expert (expected distinct experts per layer) plus ``dense_bytes`` read by every step."""
    if not expert_bytes >= 0 or not dense_bytes >= 0:
        raise ValueError(f"expert_bytes, dense_bytes: expected numbers >= 0, got {expert_bytes!r}, {dense_bytes!r}")
    _check_positive_int("n_layers", n_layers)
    return n_layers * expected_distinct_experts(num_experts, k, batch) * expert_bytes + dense_bytes


def predict_decode_ms(bandwidth_gbs: float, expert_bytes: float, num_experts: int, k: int, batch: int, *,
                      n_layers: int = 1, dense_bytes: float = 0.0) -> float:
    """The roofline's time of one decode step in ms: :func:`decode_bytes` / bandwidth (GB/s, 1e9 B/s)."""
    if not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs: expected a number > 0, got {bandwidth_gbs!r}")
    nbytes = decode_bytes(expert_bytes, num_experts, k, batch, n_layers=n_layers, dense_bytes=dense_bytes)
    return nbytes / (bandwidth_gbs * 1e9) * 1e3


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s from copying an ``nbytes`` buffer (read + write counted), median of
    ``repeats`` copies after one warm-up. Use a buffer much larger than the CPU's last-level cache."""
    _check_positive_int("nbytes", nbytes, lo=1024)
    _check_positive_int("repeats", repeats)
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9
