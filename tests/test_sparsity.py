"""Wanda and 2:4: the masks keep what they say, Wanda beats magnitude where inputs are uneven, and
2:4 storage is counted as values plus 2-bit positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moe_course.compress.sparsity import SemiStructuredExperts, nm_mask, sparsify, wanda_scores
from moe_course.dispatch import STRATEGIES
from moe_course.layers import SparseMoE, moe_layers
from moe_course.metrics import size_report


class TinyMoE(nn.Module):
    def __init__(self, d=32, h=64, e=4, activation="swiglu"):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, d)
        with torch.no_grad():
            self.emb.weight[:, :4] *= 10  # loud input channels
        self.ffn = SparseMoE(d, e, h, k=2, activation=activation)

    def forward(self, idx):
        x = self.emb(idx)
        return x + self.ffn(x)


def ids(n=256, seed=0):
    return torch.randint(0, 10, (n, 1), generator=torch.Generator().manual_seed(seed))


def test_nm_mask_keeps_two_of_every_four_highest():
    s = torch.tensor([[0.1, 5.0], [0.4, 1.0], [0.3, 2.0], [0.2, 3.0]])
    m = nm_mask(s)
    assert m[:, 0].tolist() == [False, True, True, False] and m[:, 1].tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask(torch.rand(6, 2))


def test_wanda_scores_weigh_by_input_norm():
    w = torch.ones(3, 2)
    x = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]])
    assert torch.allclose(wanda_scores(w, x)[:, 0], torch.tensor([2 ** 0.5, 0.0, 8 ** 0.5]))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_two_four_storage_and_equivalence(activation):
    model = TinyMoE(activation=activation)
    sp = sparsify(model, 0.5, calib=ids(), pattern="2:4", value_dtype=torch.float32)
    e = moe_layers(sp)[0].experts
    assert isinstance(e, SemiStructuredExperts)
    dense = moe_layers(model)[0].experts
    n_mats = 3 if activation == "swiglu" else 2
    weights = n_mats * dense.num_experts * dense.d_model * dense.d_hidden
    expert_bytes = sum(b.numel() * b.element_size() for b in e.buffers())
    assert expert_bytes == weights // 2 * 4 + weights // 2 * 2 // 8  # fp32 values + 2-bit positions
    w_in, _, _ = e.weights()
    mask = w_in != 0
    assert int(mask.transpose(1, 2).reshape(-1, 4).sum(-1).max()) <= 2
    # the rebuilt weights are the original ones where kept
    assert torch.equal(w_in[mask], dense.w_in.detach()[mask])
    x = ids(32, seed=1)
    outs = []
    for s in STRATEGIES:
        moe_layers(sp)[0].dispatch = s
        with torch.no_grad():
            outs.append(sp(x))
    assert all(torch.allclose(o, outs[0], atol=1e-5) for o in outs)


def test_two_four_fp16_is_0_5625_of_fp16_dense():
    model = TinyMoE()
    sp = sparsify(model, 0.5, score="magnitude", pattern="2:4")
    e, d = moe_layers(sp)[0].experts, moe_layers(model)[0].experts
    fp16_dense = sum(p.numel() for p in d.parameters()) * 2
    assert sum(b.numel() * b.element_size() for b in e.buffers()) / fp16_dense == 0.5625
    assert size_report(sp).bytes < size_report(model).bytes


def test_wanda_loses_less_than_magnitude_with_loud_channels():
    model = TinyMoE()
    x = ids(256, seed=3)
    with torch.no_grad():
        ref = model(x)
        err = {s: float((sparsify(model, 0.5, calib=ids(), score=s)(x) - ref).norm()) for s in ("wanda", "magnitude")}
    assert err["wanda"] < err["magnitude"]


def test_unstructured_keeps_the_fraction_per_output_and_leaves_the_input_alone():
    model = TinyMoE()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = sparsify(model, 0.25, calib=ids())
    w = moe_layers(sp)[0].experts.w_in.detach()
    assert torch.all((w != 0).sum(1) == round(0.25 * w.shape[1]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep=0.3, pattern="2:4"), "0.5"), (dict(score="sparsegpt"), "score"), (dict(pattern="4:8"), "pattern"),
    (dict(keep=1.5), "keep"), (dict(calib=None), "calib"),
])
def test_bad_arguments(kwargs, match):
    args = dict(keep=0.5, calib=ids(16))
    args.update(kwargs)
    keep = args.pop("keep")
    with pytest.raises(ValueError, match=match):
        sparsify(TinyMoE(), keep, **args)
