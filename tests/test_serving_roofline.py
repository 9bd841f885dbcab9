"""The decode roofline: expected distinct experts, bytes per step, predicted time, copy bandwidth."""

from __future__ import annotations

import math

import pytest
import torch

from moe_course.serving.roofline import copy_bandwidth, decode_bytes, expected_distinct_experts, predict_decode_ms


def test_distinct_experts_limits_and_formula():
    assert expected_distinct_experts(64, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)
    assert expected_distinct_experts(64, 8, 1000) == pytest.approx(64)
    assert expected_distinct_experts(8, 8, 3) == pytest.approx(8)
    assert expected_distinct_experts(64, 8, 2) == pytest.approx(64 * (1 - (56 / 64) ** 2))
    values = [expected_distinct_experts(64, 8, b) for b in range(1, 65)]
    assert all(a < b for a, b in zip(values, values[1:]))  # grows with the batch, below N


def test_distinct_experts_matches_sampling():
    g = torch.Generator().manual_seed(0)
    n, k, b, trials = 16, 2, 5, 4000
    picks = torch.rand(trials, b, n, generator=g).argsort(-1)[..., :k]  # k distinct experts per token
    distinct = torch.stack([torch.unique(p).numel() * torch.ones(()) for p in picks]).mean()
    assert float(distinct) == pytest.approx(expected_distinct_experts(n, k, b), rel=0.02)


def test_bytes_and_prediction():
    assert decode_bytes(100, 8, 2, 1, n_layers=4, dense_bytes=50) == pytest.approx(4 * 2 * 100 + 50)
    # 1 GB at 10 GB/s is 100 ms
    assert predict_decode_ms(10, 1e9 / 8, 64, 8, 1) == pytest.approx(100)
    with pytest.raises(ValueError, match="k"):
        expected_distinct_experts(4, 5, 1)
    with pytest.raises(ValueError, match="batch"):
        expected_distinct_experts(8, 2, 0)
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        predict_decode_ms(0, 1, 8, 2, 1)
    with pytest.raises(ValueError, match="expert_bytes"):
        decode_bytes(-1, 8, 2, 1)


def test_copy_bandwidth_is_a_rate():
    bw = copy_bandwidth(1 << 22, repeats=2)
    assert math.isfinite(bw) and bw > 0.05
