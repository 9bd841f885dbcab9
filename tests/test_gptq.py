"""GPTQ for stacked experts: RTN where the Hessian is the identity, less output error than RTN where
inputs are correlated, starved experts handled as asked, RTN's storage format and size."""

from __future__ import annotations

import pytest
import torch

from moe_course.calib import capture_experts
from moe_course.compress.gptq import gptq, gptq_quantize_matrix
from moe_course.compress.quantization import QuantizedExperts, dequantize_tensor, quantize, quantize_tensor
from moe_course.layers import moe_layers
from moe_course.metrics import size_report
from test_quantization import TinyMoE  # the same tiny SwiGLU model


def correlated(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g)   # 8 strong directions
    return low + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_identity_hessian_gives_round_to_nearest(bits, group_size):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    codes, scale, zero = gptq_quantize_matrix(w, torch.eye(64), bits, group_size)
    ref = quantize_tensor(w, bits, False, "channel" if group_size is None else "group", group_size, torch.float16)
    assert torch.equal(codes, ref[0]) and torch.equal(zero, ref[2])
    assert torch.equal(scale, ref[1])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size", [(3, None), (4, 16), (2, 16)])
def test_less_output_error_than_rtn_on_correlated_inputs(bits, group_size, act_order):
    x = correlated()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    gran = "channel" if group_size is None else "group"
    rtn = dequantize_tensor(*quantize_tensor(w, bits, False, gran, group_size, torch.float16))
    codes, scale, zero = gptq_quantize_matrix(w, 2 * x.T @ x / len(x), bits, group_size, act_order=act_order)
    ours = dequantize_tensor(codes, scale, zero)
    err = lambda w_hat: float((x @ (w - w_hat).T).norm())  # noqa: E731
    assert err(ours) < 0.5 * err(rtn)  # measured 0.19-0.32
    assert codes.max() <= 2 ** bits - 1


def calib_ids(n=256, seed=0):
    return torch.randint(0, 10, (n, 1), generator=torch.Generator().manual_seed(seed))


def test_gptq_model_has_rtn_storage_and_lower_layer_error():
    model = TinyMoE()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = calib_ids()
    g = gptq(model, 3, calib=ids, group_size=16)
    r = quantize(model, 3, group_size=16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert isinstance(moe_layers(g)[0].experts, QuantizedExperts)
    assert size_report(g).bytes == size_report(r).bytes
    assert g.gptq_report.method == [["gptq"] * 4]
    assert g.gptq_report.tokens[0] == [int(t.numel()) for t in capture_experts(model, ids, outputs=False)[0].tokens]
    with torch.no_grad():
        ref, y_g, y_r = model(ids), g(ids), r(ids)
    assert float((y_g - ref).norm()) < float((y_r - ref).norm())


def test_starved_experts_fall_back_or_see_every_token():
    model = TinyMoE()
    ids = calib_ids(64)
    rtn = gptq(model, 4, calib=ids, group_size=16, min_tokens=10_000)
    assert rtn.gptq_report.method == [["rtn"] * 4] and len(rtn.gptq_report.fallbacks) == 4
    plain = quantize(model, 4, group_size=16)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, rtn.state_dict()[k]), k
    every = gptq(model, 4, calib=ids, group_size=16, min_tokens=10_000, starved="every_expert")
    assert every.gptq_report.method == [["gptq (every token)"] * 4]
    assert "every token" in str(every.gptq_report)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits"),
    (dict(starved="skip"), "starved"),
    (dict(calib=None), "calib"),
    (dict(group_size=7), "group_size"),
    (dict(min_tokens=-1), "min_tokens"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(bits=4, calib=calib_ids(32), group_size=16)
    args.update(kwargs)
    bits = args.pop("bits")
    with pytest.raises((ValueError, TypeError), match=match):
        gptq(TinyMoE(), bits, **args)


def test_matrix_arguments_are_checked():
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_matrix(torch.randn(4, 8), torch.eye(4), 4)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize_matrix(torch.randn(4, 8), torch.eye(8), 4, damp=2.0)
