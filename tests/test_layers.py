"""Behaviour of the MoE building blocks: equivalences, invariances, losses, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_course.dispatch import STRATEGIES, capacity_mask, dispatch
from moe_course.layers import Experts, SoftMoE, SparseMoE, TopKRouter, moe_layers
from moe_course.losses import load_balancing_loss, router_z_loss


def make_sparse(**kw):
    torch.manual_seed(0)
    args = dict(d_model=16, num_experts=4, d_hidden=32, k=2)
    args.update(kw)
    return SparseMoE(**args)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_sparse_with_all_experts_equals_soft_moe(activation):
    torch.manual_seed(0)
    soft = SoftMoE(16, 4, 32, activation=activation)
    sparse = SparseMoE(16, 4, 32, k=4, activation=activation)
    sparse.load_state_dict(soft.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(sparse(x), soft(x), rtol=1e-5, atol=1e-6)


def test_soft_moe_is_probability_weighted_sum_of_experts():
    torch.manual_seed(0)
    soft = SoftMoE(8, 3, 16, output_proj=True)
    x = torch.randn(6, 8)
    g = torch.softmax(x @ soft.router.gate.weight.T, dim=-1)
    expected = sum(g[:, i : i + 1] * soft.experts[i](x) for i in range(3))
    torch.testing.assert_close(soft(x), soft.proj(expected), rtol=1e-5, atol=1e-6)


def test_expert_view_shares_storage_with_stack():
    ex = Experts(3, 8, 16)
    view = ex[1]
    assert view.w_in.data_ptr() == ex.w_in[1].data_ptr()
    x = torch.randn(4, 8)
    torch.testing.assert_close(view(x), ex.expert_forward(1, x))
    assert len(ex) == 3 and "d_hidden=16" in repr(view)
    with pytest.raises(IndexError):
        ex[3]


def test_permuting_hidden_neurons_changes_nothing():
    torch.manual_seed(0)
    ex = Experts(2, 8, 16, "swiglu")
    x = torch.randn(5, 8)
    before = ex.forward_all(x)
    perm = torch.randperm(16)
    with torch.no_grad():
        ex.w_in.copy_(ex.w_in[:, :, perm])
        ex.w_gate.copy_(ex.w_gate[:, :, perm])
        ex.w_out.copy_(ex.w_out[:, perm, :])
    torch.testing.assert_close(ex.forward_all(x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_topk_and_renormalisation(renormalize):
    torch.manual_seed(0)
    r = TopKRouter(8, 6, k=2, renormalize=renormalize)
    out = r(torch.randn(10, 8))
    assert out.weights.shape == out.indices.shape == (10, 2)
    assert out.logits.dtype == torch.float32 and out.probs.shape == (10, 6)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(10))
    # The chosen experts are the largest probabilities.
    torch.testing.assert_close(out.probs.gather(1, out.indices), out.probs.topk(2).values)
    sums = out.weights.sum(-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(10))
        # softmax -> top-k -> renormalise == softmax over the kept logits
        torch.testing.assert_close(out.weights, torch.softmax(out.logits.gather(1, out.indices), -1))
    else:
        assert (sums < 1).all()


def test_noisy_router_noise_only_in_training():
    torch.manual_seed(0)
    r = TopKRouter(8, 4, k=1, noisy=True)
    with torch.no_grad():
        r.gate.weight.normal_()
    x = torch.randn(32, 8)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.probs, b.probs)
    r.train()
    assert not torch.equal(r(x).probs, r(x).probs)


def test_router_stays_float32_under_autocast():
    r = TopKRouter(8, 4, k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(torch.randn(5, 8, dtype=torch.bfloat16))
    assert out.logits.dtype == out.probs.dtype == torch.float32


def test_load_balancing_loss_is_one_when_balanced_and_n_when_collapsed():
    n = 8
    t = 64
    balanced_probs = torch.full((t, n), 1 / n)
    balanced_idx = torch.arange(t).remainder(n)[:, None]
    assert load_balancing_loss(balanced_probs, balanced_idx, n).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(t, n)
    collapsed_probs[:, 0] = 1
    collapsed_idx = torch.zeros(t, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed_probs, collapsed_idx, n).item() == pytest.approx(n)


def test_balance_loss_gradient_flows_to_router_only_through_probs():
    layer = make_sparse(k=1, renormalize=False)
    layer(torch.randn(20, 16))
    layer.aux_losses["balance"].backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_z_loss_matches_formula_and_is_small_for_small_logits():
    logits = torch.randn(7, 5)
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_capacity_mask_first_choices_win_and_counts_bounded():
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    keep = capacity_mask(idx, num_experts=3, capacity=2)
    # Choice-major priority. Expert 0: first choices of tokens 0, 1 fit, token 2's does not, nor
    # token 3's second. Expert 1: token 3's first choice goes before the second choices of
    # tokens 0 and 1, so token 1's second choice is the one that drops.
    assert keep.tolist() == [[True, True], [True, False], [False, True], [True, False]]
    for e in range(3):
        assert int(((idx == e) & keep).sum()) <= 2


def test_dropped_tokens_get_zero_moe_output():
    layer = make_sparse(capacity_factor=0.25)  # capacity 3 of 12 assignments per expert
    torch.manual_seed(1)
    x = torch.randn(12, 16)
    y = layer(x)
    keep = layer.last_routing.keep
    fully_dropped = ~keep.any(-1)
    assert fully_dropped.any(), "test needs some token with all choices dropped"
    assert torch.all(y[fully_dropped] == 0)
    assert layer.capacity(12) == math.ceil(0.25 * 12 * 2 / 4)


def test_shared_experts_add_to_every_token():
    layer = make_sparse(num_shared_experts=1)
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer.shared.w_out.zero_()
        base = layer(x)
        layer.shared.w_out.normal_()
        with_shared = layer(x)
    torch.testing.assert_close(with_shared - base, layer.shared.forward_all(x).sum(0), rtol=1e-5, atol=1e-5)
    assert layer.active_params_per_token() == 16 * 4 + 3 * 2 * 16 * 32  # router + (2 routed + 1 shared)


def test_active_flops_and_params_closed_form():
    layer = SparseMoE(16, 8, 32, k=2, activation="swiglu")
    assert layer.active_params_per_token() == 16 * 8 + 2 * 3 * 16 * 32
    assert layer.flops_per_token() == 2 * layer.active_params_per_token()
    assert sum(p.numel() for p in layer.parameters()) > layer.active_params_per_token()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_dispatch_strategies_agree_in_output_and_gradients(strategy, activation, capacity_factor):
    reference = make_sparse(activation=activation, capacity_factor=capacity_factor, dispatch="loop")
    layer = make_sparse(activation=activation, capacity_factor=capacity_factor, dispatch=strategy)
    layer.load_state_dict(reference.state_dict())
    torch.manual_seed(3)
    x = torch.randn(3, 9, 16)
    results = []
    for m in (reference, layer):
        xx = x.clone().requires_grad_(True)
        y = m(xx)
        (y * y).sum().backward()
        results.append((y, xx.grad, [p.grad for p in m.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_falls_back_when_dims_are_not_aligned():
    torch.manual_seed(0)
    ex = Experts(3, 10, 14)  # 10 * 4 bytes is not a multiple of 16: no grouped_mm
    x, w = torch.randn(6, 10), torch.rand(6, 2)
    idx = torch.randint(0, 3, (6, 2))
    torch.testing.assert_close(dispatch(x, w, idx, ex, "grouped"), dispatch(x, w, idx, ex, "naive"))


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 24),
    num_experts=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    capacity_factor=st.one_of(st.none(), st.floats(0.05, 3.0)),
    seed=st.integers(0, 1000),
)
def test_property_strategies_equal_and_finite(tokens, num_experts, k_frac, capacity_factor, seed):
    k = max(1, round(k_frac * num_experts))
    torch.manual_seed(seed)
    layer = SparseMoE(8, num_experts, 8, k=k, capacity_factor=capacity_factor)
    x = torch.randn(tokens, 8)
    outs = []
    for s in STRATEGIES:
        layer.dispatch = s
        outs.append(layer(x))
    for o in outs:
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_moe_layers_finds_layers_in_module_order():
    model = torch.nn.Sequential(make_sparse(), torch.nn.Linear(16, 16), SoftMoE(16, 2, 8))
    found = moe_layers(model)
    assert [type(m).__name__ for m in found] == ["SparseMoE", "SoftMoE"]


def test_last_routing_is_detached_and_readable():
    layer = make_sparse()
    layer(torch.randn(4, 3, 16, requires_grad=True))
    r = layer.last_routing
    assert r.indices.shape == (12, 2) and not r.weights.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=5), "k"),
        (dict(k=0), "k"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(dispatch="fast"), "dispatch"),
        (dict(activation="relu6"), "activation"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
    ],
)
def test_bad_arguments_raise_early_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sparse(**kwargs)


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(ValueError, match="d_model=16"):
        make_sparse()(torch.randn(3, 15))
    with pytest.raises(TypeError, match="x"):
        make_sparse()([1.0] * 16)


def test_layer_can_be_deep_copied_after_a_training_forward():
    import copy

    layer = make_sparse()
    layer(torch.randn(6, 16)).sum().backward()
    clone = copy.deepcopy(layer)
    assert not clone.aux_losses["balance"].requires_grad
    assert layer.aux_losses["balance"].requires_grad  # the original keeps its graph for training
    x = torch.randn(4, 16)
    torch.testing.assert_close(clone(x), layer(x))
