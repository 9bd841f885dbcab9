"""Activation-aware scaling: folding is exact (same outputs, same routing), the search never does
worse than round-to-nearest on its data, and the quantized result stores what RTN stores."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moe_course.compress.awq import awq, awq_scale, search_scale
from moe_course.compress.quantization import quantize
from moe_course.layers import SparseMoE, moe_layers
from moe_course.metrics import size_report


class NormMoE(nn.Module):
    def __init__(self, d=32, h=64, e=4, activation="swiglu", shared=0, norm=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, d)
        with torch.no_grad():  # a few loud channels, as in trained models
            self.emb.weight[:, :3] *= 8
        self.ln = nn.LayerNorm(d) if norm else nn.Identity()
        self.ffn = SparseMoE(d, e, h, k=2, activation=activation, num_shared_experts=shared)
        with torch.no_grad():
            self.ln.weight.copy_(torch.linspace(0.2, 3.0, d)) if norm else None

    def forward(self, idx):
        x = self.emb(idx)
        return x + self.ffn(self.ln(x))


def ids(n=256, seed=0):
    return torch.randint(0, 10, (n, 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("activation,shared", [("swiglu", 0), ("gelu", 0), ("swiglu", 1)])
def test_folded_scales_change_nothing(activation, shared):
    model = NormMoE(activation=activation, shared=shared)
    scaled = awq_scale(model, 3, calib=ids(), group_size=16)
    x = ids(64, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), model(x), rtol=1e-4, atol=1e-5)
        assert torch.equal(moe_layers(scaled)[0].router(scaled.ln(scaled.emb(x))).indices,
                           moe_layers(model)[0].router(model.ln(model.emb(x))).indices)
    rep = scaled.awq_report
    assert len(rep.alpha_in) == 1 and rep.error_in[0][1] <= rep.error_in[0][0]
    assert (all(a is None for a in rep.alpha_out[0]) if activation == "gelu"
            else all(a is not None for a in rep.alpha_out[0]))


def test_search_never_worse_than_rtn_and_helps_on_loud_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.cat([torch.full((4,), 20.0), torch.ones(60)])
    w = torch.randn(64, 32, generator=g)
    s, alpha, err0, err1 = search_scale([(x, w)], 3, 16)
    assert err1 <= err0 and alpha > 0 and err1 < 0.9 * err0
    assert s.shape == (64,) and float(s[:4].mean()) > float(s[4:].mean())


def test_awq_has_rtn_bytes_and_less_output_error():
    model = NormMoE()
    calib = ids()
    a, r = awq(model, 3, calib=calib, group_size=16), quantize(model, 3, group_size=16)
    assert size_report(a).bytes == size_report(r).bytes
    x = ids(128, seed=2)
    with torch.no_grad():
        ref = model(x)
        assert float((a(x) - ref).norm()) < float((r(x) - ref).norm())


def test_clear_errors():
    with pytest.raises(ValueError, match="LayerNorm"):
        awq_scale(NormMoE(norm=False), 4, calib=ids())
    with pytest.raises(ValueError, match="calib"):
        awq_scale(NormMoE(), 4)
    with pytest.raises(ValueError, match="bits"):
        awq_scale(NormMoE(), 5, calib=ids())
    model = NormMoE()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    awq(model, 4, calib=ids(), group_size=16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_folds_into_the_right_norm_of_a_course_transformer():
    """A Transformer block has two norms; the scale must go into the one before the MoE layer
    (found by tensor identity, not by id(), which Python reuses once a tensor is freed)."""
    import datasets

    from moe_course.models import LMConfig, model_from_config

    torch.manual_seed(0)
    lm = model_from_config(LMConfig(d_model=32, n_layers=2, n_heads=2, num_experts=4, k=2, d_hidden=32,
                                    context_length=16, vocab_size=20, activation="swiglu"))
    rows = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 20, (16, 17)).tolist()}).with_format("torch")
    scaled = awq_scale(lm, 3, calib=rows, group_size=16)
    x = torch.randint(0, 20, (4, 16))
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), lm(x), rtol=1e-4, atol=1e-4)
