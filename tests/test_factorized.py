"""μMoE layers (moe_course.factorized): factorised == materialised, closed-form sizes, entmax-1.5, gating."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_course.grading.core import LargestIntermediate
from moe_course.factorized import (
    CPMuMoE,
    MuMoE,
    MuMoEBlock,
    MuMoEGate,
    TRMuMoE,
    UnfactorizedMuMoE,
    build_mumoe_ffn,
    cp_als,
    cp_mumoe_params,
    cp_rank_for_budget,
    cp_to_tensor,
    dense_ffn_params,
    entmax15,
    tr_mumoe_params,
    tr_rank_for_budget,
    tr_to_tensor,
    unfactorized_params,
)

D64 = torch.float64


# ------------------------------------------------------------------------------------------
# references written independently of the package
# ------------------------------------------------------------------------------------------
def entmax15_bisect(z: torch.Tensor, n_iter: int = 200) -> torch.Tensor:
    """Solve sum_i [z_i/2 - tau]_+^2 = 1 for tau by bisection (float64), last dim."""
    z = z.to(D64) / 2
    lo = z.amax(-1, keepdim=True) - 1.0  # sum >= 1 here (the max entry alone gives 1)
    hi = z.amax(-1, keepdim=True)  # sum = 0 here
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        s = (z - mid).clamp_min(0).pow(2).sum(-1, keepdim=True)
        lo = torch.where(s >= 1, mid, lo)
        hi = torch.where(s >= 1, hi, mid)
    p = (z - (lo + hi) / 2).clamp_min(0).pow(2)
    return p / p.sum(-1, keepdim=True)


def entmax15_bruteforce(z: list[float]) -> list[float]:
    """Enumerate every support set; keep the one whose tau satisfies the KKT conditions."""
    half = [v / 2 for v in z]
    d = len(z)
    for k in range(1, d + 1):
        for support in itertools.combinations(range(d), k):
            s = [half[i] for i in support]
            mean = sum(s) / k
            disc = mean * mean - (sum(v * v for v in s) - 1) / k
            if disc < 0:
                continue
            tau = mean - math.sqrt(disc)  # the root below every support entry
            inside = all(v > tau for v in s)
            outside = all(half[j] <= tau for j in range(d) if j not in support)
            if inside and outside:
                return [max(half[i] - tau, 0.0) ** 2 for i in range(d)]
    raise AssertionError("no support satisfied the KKT conditions")


def materialised_forward(w: torch.Tensor, z: torch.Tensor, coeffs: list[torch.Tensor], bias: bool = True):
    """y_o = sum_{n..., i} W[n..., i, o] a1[n1] a2[n2] ... zbar_i, as one einsum over the full tensor."""
    zbar = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1) if bias else z
    letters = "nmk"[: len(coeffs)]
    spec = ",".join(f"t{l}" for l in letters) + f",{letters}io,ti->to"
    return torch.einsum(spec, *coeffs, w, zbar)


def make_layer(kind: str, modes, in_f=7, out_f=5, bias=True):
    h = len(modes)
    if kind == "cp":
        return CPMuMoE(in_f, out_f, modes, rank=4, bias=bias).double()
    return TRMuMoE(in_f, out_f, modes, ranks=(2, 3, 4, 3)[: h + 2] if h == 2 else (2, 3, 4), bias=bias).double()


def random_coeffs(modes, t=6):
    return [torch.softmax(torch.randn(t, n, dtype=D64), -1).requires_grad_(True) for n in modes]


# ------------------------------------------------------------------------------------------
# factorised forward == materialised contraction, output and gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cp", "tr"])
@pytest.mark.parametrize("modes", [(6,), (3, 4)], ids=["flat", "hierarchical"])
@pytest.mark.parametrize("bias", [True, False])
def test_factorised_equals_materialised_output_and_gradients(kind, modes, bias):
    torch.manual_seed(0)
    layer = make_layer(kind, modes, bias=bias)
    with torch.no_grad():  # non-trivial expert factors/cores (the init makes later modes all ones)
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(6, 7, dtype=D64, requires_grad=True)
    coeffs = random_coeffs(modes)
    probe = torch.randn(6, 5, dtype=D64)

    y = layer(z, coeffs)
    (y * probe).sum().backward()
    got = [z.grad.clone()] + [a.grad.clone() for a in coeffs] + [p.grad.clone() for p in layer.parameters()]

    for t in [z, *coeffs, *layer.parameters()]:
        t.grad = None
    w = layer.weight_tensor()  # built from the same factors, differentiably
    assert w.shape == (*modes, 7 + bias, 5)
    y_ref = materialised_forward(w, z, coeffs, bias)
    (y_ref * probe).sum().backward()
    want = [z.grad] + [a.grad for a in coeffs] + [p.grad for p in layer.parameters()]

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("modes", [(5,), (2, 3)])
def test_unfactorised_layer_is_a_soft_mixture_of_linear_experts(modes):
    torch.manual_seed(1)
    layer = UnfactorizedMuMoE(4, 3, modes).double()
    z = torch.randn(8, 4, dtype=D64)
    coeffs = random_coeffs(modes, t=8)
    zbar = torch.cat([z, torch.ones(8, 1, dtype=D64)], 1)
    y_loop = torch.zeros(8, 3, dtype=D64)
    for idx in itertools.product(*(range(n) for n in modes)):
        a = math.prod(1.0 for _ in idx) * torch.ones(8, dtype=D64)
        for c, i in zip(coeffs, idx):
            a = a * c[:, i]
        y_loop += a[:, None] * (zbar @ layer.weight[idx])  # expert idx is a linear map with bias
    torch.testing.assert_close(layer(z, coeffs), y_loop)


def test_from_weight_roundtrip_and_leading_dims():
    torch.manual_seed(2)
    cp = CPMuMoE(6, 4, 5, rank=3).double()
    ref = UnfactorizedMuMoE.from_weight(cp.weight_tensor().detach())
    z = torch.randn(2, 3, 6, dtype=D64)
    a = torch.softmax(torch.randn(2, 3, 5, dtype=D64), -1)
    y = cp(z, a)
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y, ref(z, a))


def test_tr_and_cp_to_tensor_match_definitions():
    torch.manual_seed(3)
    cores = [torch.randn(2, 3, 4, dtype=D64), torch.randn(4, 5, 3, dtype=D64), torch.randn(3, 2, 2, dtype=D64)]
    full = tr_to_tensor(cores)
    n, i, o = 1, 4, 0
    assert full.shape == (3, 5, 2)
    want = torch.trace(cores[0][:, n, :] @ cores[1][:, i, :] @ cores[2][:, o, :])
    torch.testing.assert_close(full[n, i, o], want)
    factors = [torch.randn(3, 2, dtype=D64), torch.randn(4, 2, dtype=D64), torch.randn(5, 2, dtype=D64)]
    full = cp_to_tensor(factors)
    torch.testing.assert_close(full[2, 1, 4], sum(factors[0][2, r] * factors[1][1, r] * factors[2][4, r] for r in range(2)))
    with pytest.raises(ValueError, match="factors"):
        cp_to_tensor([torch.randn(3, 2), torch.randn(4, 3)])
    with pytest.raises(ValueError, match="cores"):
        tr_to_tensor([torch.randn(2, 3, 4), torch.randn(3, 5, 2)])


@pytest.mark.parametrize("kind", ["cp", "tr"])
def test_forward_never_materialises_the_weight_tensor(kind):
    n, i, o, t = 512, 64, 64, 16
    layer = CPMuMoE(i, o, n, rank=16) if kind == "cp" else TRMuMoE(i, o, n, ranks=(4, 4, 8))
    z, a = torch.randn(t, i), torch.softmax(torch.randn(t, n), -1)
    with torch.no_grad(), LargestIntermediate() as mode:
        layer(z, a)
    # Every intermediate is far smaller than W (n (i+1) o = 2.1M entries) or a per-token W(a) (t i o).
    assert mode.largest < min(n * (i + 1) * o, t * i * o) // 4, mode.largest


def test_cp_initialisation_follows_the_reference_code():
    torch.manual_seed(0)
    layer = CPMuMoE(100, 50, (400, 3), rank=64)
    u1, u2 = layer.expert_factors
    assert abs(u1.mean().item() - 1.0) < 0.05 and abs(u1.std().item() - 1.0) < 0.05  # N(1, 1)
    assert torch.equal(u2, torch.ones_like(u2))  # later expert modes: ones
    assert layer.in_factor.abs().max() <= math.sqrt(1 / 100)
    assert layer.out_factor.abs().max() <= math.sqrt(1 / 64)


def test_tr_initialisation_follows_the_reference_code():
    torch.manual_seed(0)
    layer = TRMuMoE(100, 50, (300, 5), ranks=(4, 4, 4, 8))
    g1, g2 = layer.expert_cores
    off_diag = ~torch.eye(4, dtype=torch.bool)
    assert (g1.permute(1, 0, 2)[:, off_diag] == 0).all()  # slices are diagonal
    diag = torch.diagonal(g1, dim1=0, dim2=2)
    assert abs(diag.mean().item() - 1.0) < 0.1 and abs(diag.std().item() - 1.0) < 0.1
    assert torch.equal(g2, torch.eye(4)[:, None, :].expand_as(g2))  # var 0: exactly eye
    assert layer.in_core.abs().max() <= math.sqrt(1 / 100)
    assert layer.out_core.abs().max() <= math.sqrt(1 / (8 * 4))


# ------------------------------------------------------------------------------------------
# parameter counts and rank-for-budget
# ------------------------------------------------------------------------------------------
def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("modes", [17, (4, 6)])
def test_parameter_counts_equal_closed_forms(modes):
    i, o, h = 12, 9, 20
    flat = (modes,) if isinstance(modes, int) else modes
    ranks = (3, 5) + ((2,) if len(flat) == 2 else ()) + (7,)
    assert count(MuMoE(i, o, modes, "cp", rank=6)) == cp_mumoe_params(i, o, modes, 6)
    assert count(MuMoE(i, o, modes, "tr", ranks=ranks)) == tr_mumoe_params(i, o, modes, ranks)
    assert count(MuMoE(i, o, modes, "none")) == unfactorized_params(i, o, modes)
    assert count(MuMoEBlock(i, h, modes, "cp", rank=6, out_features=o)) == cp_mumoe_params(i, o, modes, 6, hidden_features=h)
    assert count(MuMoEBlock(i, h, modes, "tr", ranks=ranks, out_features=o)) == tr_mumoe_params(
        i, o, modes, ranks, hidden_features=h)
    n = math.prod(flat)
    # the hand-written forms of the paper's appendix (flat, one layer, gate included)
    if len(flat) == 1:
        assert cp_mumoe_params(i, o, n, 6) == 6 * (n + i + 1 + o) + i * n
        assert tr_mumoe_params(i, o, n, (3, 5, 7)) == 3 * n * 5 + 5 * (i + 1) * 7 + 7 * o * 3 + i * n
    assert unfactorized_params(i, o, modes, gate=False) == n * (i + 1) * o
    assert cp_mumoe_params(i, o, modes, 6, bias=False, gate=False) == 6 * (sum(flat) + i + o)


def test_dense_ffn_params_match_the_models_dense_ffn():
    from moe_course.models import DenseFFN

    for act in ("gelu", "swiglu"):
        assert count(DenseFFN(24, 40, act)) == dense_ffn_params(24, 40, act)


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(4, 256),
    h=st.integers(4, 512),
    modes=st.sampled_from([8, 16, 64, (4, 4), (8, 16)]),
    slack=st.floats(0.5, 3.0),
    block=st.booleans(),
)
def test_rank_for_budget_is_the_largest_rank_within_budget(d, h, modes, slack, block):
    hidden = h if block else None
    budget = int(slack * (dense_ffn_params(d, h) if block else d * d + d))
    try:
        r = cp_rank_for_budget(budget, d, d, modes, hidden_features=hidden)
    except ValueError as err:
        assert "budget" in str(err)
        assert cp_mumoe_params(d, d, modes, 1, hidden_features=hidden) > budget
    else:
        assert cp_mumoe_params(d, d, modes, r, hidden_features=hidden) <= budget
        assert cp_mumoe_params(d, d, modes, r + 1, hidden_features=hidden) > budget
    try:
        ranks = tr_rank_for_budget(budget, d, d, modes, hidden_features=hidden)
    except ValueError as err:
        assert "budget" in str(err)
    else:
        assert tr_mumoe_params(d, d, modes, ranks, hidden_features=hidden) <= budget
        bigger = (*ranks[:-1], ranks[-1] + 1)
        assert tr_mumoe_params(d, d, modes, bigger, hidden_features=hidden) > budget


def test_block_defaults_to_parameter_match_with_the_dense_mlp():
    for fac in ("cp", "tr"):
        block = MuMoEBlock(64, 128, 64, fac)
        budget = dense_ffn_params(64, 128)
        assert 0.9 * budget <= count(block) <= budget, (fac, count(block), budget)


def test_gate_alone_over_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="budget.*gate"):
        cp_rank_for_budget(768 * 1000 + 1000, 768, 1000, 1024)
    with pytest.raises(ValueError, match="budget"):
        tr_rank_for_budget(768 * 1000 + 1000, 768, 1000, 1024)
    assert cp_rank_for_budget(769_000, 768, 1000, 128) == 353  # largest R within budget (paper's ceil gives 354)
    assert tr_rank_for_budget(769_000, 768, 1000, 128) == (4, 4, 94)


# ------------------------------------------------------------------------------------------
# entmax-1.5
# ------------------------------------------------------------------------------------------
def test_entmax15_sums_to_one_and_is_sparse():
    torch.manual_seed(0)
    z = torch.randn(50, 16) * 3
    p = entmax15(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(50))
    assert (p >= 0).all()
    assert (p == 0).any(dim=-1).float().mean() > 0.9  # spread-out logits: most rows have exact zeros
    torch.testing.assert_close(entmax15(torch.tensor([3.0, 0.0, 0.0])), torch.tensor([1.0, 0.0, 0.0]))
    # equal logits: uniform, nothing dropped
    torch.testing.assert_close(entmax15(torch.zeros(4, 7)), torch.full((4, 7), 1 / 7))
    # a gap below 2 between the top two keeps both (z/2 differ by < 1)
    p = entmax15(torch.tensor([1.0, 0.0, -5.0]))
    assert p[0] > p[1] > 0 and p[2] == 0


def test_entmax15_matches_bisection_and_bruteforce():
    torch.manual_seed(1)
    z = torch.randn(200, 9, dtype=D64) * torch.rand(200, 1, dtype=D64) * 6
    torch.testing.assert_close(entmax15(z), entmax15_bisect(z), rtol=1e-9, atol=1e-12)
    # many experts: rows are first solved on their top entries; wide supports fall back to a full sort
    wide = torch.randn(60, 700, dtype=D64) * torch.logspace(-3, 1, 60, dtype=D64)[:, None]
    wide[0] = 0.0  # support = every entry
    p = entmax15(wide)
    assert (p > 0).sum(-1).max() == 700 and (p > 0).sum(-1).min() < 32  # both paths are exercised
    torch.testing.assert_close(p, entmax15_bisect(wide), rtol=1e-9, atol=1e-12)
    for row in torch.randn(30, 5, dtype=D64) * 2:
        torch.testing.assert_close(entmax15(row), torch.tensor(entmax15_bruteforce(row.tolist()), dtype=D64))


@given(st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=12), st.floats(-1e3, 1e3))
@settings(max_examples=80, deadline=None)
def test_entmax15_properties(values, shift):
    z = torch.tensor(values, dtype=D64)
    p = entmax15(z)
    assert abs(p.sum().item() - 1) < 1e-9 and (p >= 0).all()
    torch.testing.assert_close(entmax15(z + shift), p, rtol=1e-7, atol=1e-9)  # shift invariant
    order = torch.argsort(z, descending=True)
    assert (p[order][:-1] >= p[order][1:] - 1e-12).all()  # monotone in the logits
    torch.testing.assert_close(p, entmax15_bisect(z[None])[0], rtol=1e-7, atol=1e-9)


def test_entmax15_gradcheck_float64():
    torch.manual_seed(2)
    z = (torch.randn(5, 8, dtype=D64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(entmax15, (z,))
    z3 = (torch.randn(3, 6, 4, dtype=D64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: entmax15(v, dim=1), (z3,))
    assert torch.autograd.gradgradcheck is not None  # (second order is not needed by the course)


def test_entmax15_backward_is_zero_off_support_and_sums_to_zero():
    z = torch.tensor([[2.0, 1.5, -3.0, -4.0]], requires_grad=True)
    p = entmax15(z)
    assert p[0, 2] == 0 and p[0, 3] == 0
    p.backward(torch.randn(1, 4))
    assert z.grad[0, 2] == 0 and z.grad[0, 3] == 0
    assert abs(z.grad.sum().item()) < 1e-6  # entmax is shift invariant: gradients sum to zero


def test_entmax15_dims_masks_and_dtypes():
    z = torch.randn(3, 5, 7)
    torch.testing.assert_close(entmax15(z, dim=1), entmax15(z.transpose(1, 2), dim=-1).transpose(1, 2))
    masked = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf")]])
    p = entmax15(masked)
    assert p[0, 1] == 0 and p[0, 3] == 0 and abs(p.sum().item() - 1) < 1e-6
    ph = entmax15(z.to(torch.bfloat16))
    assert ph.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dim"):
        entmax15(z, dim=3)
    with pytest.raises(TypeError, match="z"):
        entmax15(torch.arange(4))
    with pytest.raises(TypeError, match="z"):
        entmax15([1.0, 2.0])


# ------------------------------------------------------------------------------------------
# gating
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["ln", "bn", "none"])
@pytest.mark.parametrize("act", ["entmax15", "softmax"])
def test_gate_starts_uniform(norm, act):
    gate = MuMoEGate(10, (8, 3), normalization=norm, activation=act)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in gate.weights)
    a1, a2 = gate(torch.randn(4, 10))
    torch.testing.assert_close(a1, torch.full((4, 8), 1 / 8))
    torch.testing.assert_close(a2, torch.full((4, 3), 1 / 3))


def test_gate_layernorm_and_softmax_option():
    torch.manual_seed(0)
    gate = MuMoEGate(6, 5, normalization="ln", activation="softmax")
    with torch.no_grad():
        gate.weights[0].normal_()
    x = torch.randn(9, 6)
    logits = x @ gate.weights[0]
    want = torch.softmax(F.layer_norm(logits, (5,)), -1)
    torch.testing.assert_close(gate(x)[0], want)
    assert len(list(gate.norms[0].parameters())) == 0  # no affine parameters


def test_gate_batchnorm_train_and_eval_modes():
    torch.manual_seed(0)
    gate = MuMoEGate(6, 5, normalization="bn")
    with torch.no_grad():
        gate.weights[0].normal_()
    x = torch.randn(32, 6)
    logits = x @ gate.weights[0].detach()
    gate.train()
    a_train = gate(x)[0]
    batch_norm = (logits - logits.mean(0)) / torch.sqrt(logits.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(a_train, entmax15(batch_norm))
    assert len(list(gate.norms[0].parameters())) == 0
    # eval: running statistics, so one token's coefficients do not depend on the rest of the batch
    gate.eval()
    bn = gate.norms[0]
    running = (logits - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5)
    torch.testing.assert_close(gate(x)[0], entmax15(running))
    torch.testing.assert_close(gate(x[:1])[0], gate(x)[0][:1])
    assert not torch.allclose(gate(x)[0], a_train)


def test_silence_and_restore():
    gate = MuMoEGate(4, (6, 2))
    gate.silence([1, 4])
    a1, a2 = gate(torch.randn(3, 4))
    assert (a1[:, [1, 4]] == 0).all() and (a1[:, [0, 2, 3, 5]] > 0).all() and (a2 > 0).all()
    gate.restore()
    assert (gate(torch.randn(3, 4))[0] > 0).all()
    with pytest.raises(ValueError, match="experts"):
        gate.silence([6])
    with pytest.raises(ValueError, match="mode"):
        gate.silence([0], mode=2)
    assert "mask_0" not in gate.state_dict()  # an edit, not part of the checkpoint


def test_gate_gradients_reach_a_zero_initialised_gate():
    torch.manual_seed(0)
    block = MuMoEBlock(8, 16, 6, "cp")
    block(torch.randn(20, 8)).pow(2).mean().backward()
    assert block.gate.weights[0].grad.abs().max() > 0


# ------------------------------------------------------------------------------------------
# blocks, records and the models
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fac", ["cp", "tr", "none"])
def test_block_is_two_layers_sharing_coefficients(fac):
    torch.manual_seed(0)
    kw = {"cp": dict(rank=5), "tr": dict(ranks=(2, 2, 3)), "none": {}}[fac]
    block = MuMoEBlock(8, 12, 4, fac, **kw).double()
    block.keep_coefficients = True
    with torch.no_grad():
        block.gate.weights[0].normal_()
    x = torch.randn(2, 5, 8, dtype=D64)
    y = block(x)
    assert y.shape == x.shape
    a = block.gate(x.reshape(-1, 8))
    torch.testing.assert_close(block.last_coefficients[0], a[0])
    want = block.layer2(F.gelu(block.layer1(x.reshape(-1, 8), a)), a).reshape(2, 5, 8)
    torch.testing.assert_close(y, want)


def test_block_in_the_course_classifier_trains():
    from moe_course.models import ClassifierConfig, MoEClassifier

    torch.manual_seed(0)
    cfg = ClassifierConfig(d_model=16, n_layers=1, n_heads=2, num_experts=4, k=2, d_hidden=32, ffn="dense")
    model = MoEClassifier(cfg)
    for block in model.blocks:
        block.ffn = build_mumoe_ffn(cfg.replace(num_experts=8), "tr")
    batch = {"x": torch.randn(8, 40), "y": torch.randint(0, 10, (8,))}
    loss, metrics = model.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.blocks[0].ffn.gate.weights[0].grad is not None
    assert count(model.blocks[0].ffn) <= dense_ffn_params(16, 32)


def test_registered_ffn_names_build_parameter_matched_blocks():
    from moe_course import models

    cfg = models.ClassifierConfig(d_model=16, n_layers=1, n_heads=2, num_experts=8, k=2, d_hidden=32, ffn="mumoe-cp")
    model = models.MoEClassifier(cfg)
    ffn = model.blocks[0].ffn
    assert isinstance(ffn, MuMoEBlock) and ffn.factorization == "cp"
    assert count(ffn) <= dense_ffn_params(16, 32) and ffn.gate.weights[0].abs().sum() == 0  # zero gate survives init
    lm_cfg = models.LMConfig(d_model=16, n_layers=1, n_heads=2, num_experts=8, d_hidden=32, ffn="mumoe-tr",
                             vocab_size=20, context_length=8)
    lm = models.MoETransformerLM(lm_cfg)
    assert isinstance(lm.blocks[0].ffn, MuMoEBlock) and lm.blocks[0].ffn.factorization == "tr"
    assert lm(torch.randint(0, 20, (2, 8))).shape == (2, 8, 20)


def test_build_ffn_options():
    from moe_course.models import ClassifierConfig

    cfg = ClassifierConfig(d_model=16, num_experts=8, d_hidden=32, ffn="dense", n_heads=2)
    assert build_mumoe_ffn(cfg, "cp").rank == cp_rank_for_budget(dense_ffn_params(16, 32), 16, 16, 8, hidden_features=32)
    cfg.ffn_options = {"expert_modes": (4, 4), "rank": 3}
    block = build_mumoe_ffn(cfg, "cp")
    assert block.expert_modes == (4, 4) and block.rank == 3
    cfg.ffn_options = {"rnak": 3}
    with pytest.raises(ValueError, match="ffn_options.*rnak"):
        build_mumoe_ffn(cfg, "cp")


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CPMuMoE(4, 4, 8, rank=0), "rank"),
        (lambda: CPMuMoE(4, 4, 8, rank=-2), "rank"),
        (lambda: CPMuMoE(4, 4, 8, rank=2.5), "rank"),
        (lambda: TRMuMoE(4, 4, 8, ranks=(2, 0, 3)), r"ranks\[1\]"),
        (lambda: TRMuMoE(4, 4, 8, ranks=(2, 3)), "ranks.*3 ranks"),
        (lambda: TRMuMoE(4, 4, (2, 2), ranks=(2, 3, 4)), "ranks.*4 ranks"),
        (lambda: TRMuMoE(4, 4, 8, ranks=3), "ranks"),
        (lambda: TRMuMoE(4, 4, 8, ranks=[[2, None, 3], [3, None, 2], [2, None, 2]]), "ranks"),
        (lambda: CPMuMoE(4, 4, 0, rank=2), "num_experts"),
        (lambda: CPMuMoE(4, 4, (4, 0), rank=2), r"num_experts\[1\]"),
        (lambda: CPMuMoE(4, 4, (), rank=2), "num_experts"),
        (lambda: TRMuMoE(4, 4, -1, ranks=(2, 2, 2)), "num_experts"),
        (lambda: MuMoEGate(4, 0), "num_experts"),
        (lambda: CPMuMoE(0, 4, 8, rank=2), "in_features"),
        (lambda: MuMoEGate(4, 8, normalization="rms"), "normalization"),
        (lambda: MuMoEGate(4, 8, activation="sparsemax"), "activation"),
        (lambda: MuMoE(4, 4, 8, "tucker", rank=2), "factorization"),
        (lambda: MuMoE(4, 4, 8, "cp"), "rank"),
        (lambda: MuMoE(4, 4, 8, "tr", rank=3), "ranks"),
        (lambda: cp_rank_for_budget(0, 4, 4, 8), "budget"),
        (lambda: MuMoEBlock(4, 0, 8), "d_hidden"),
    ],
)
def test_bad_arguments_are_named(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_mismatched_input_width_and_coefficients():
    layer = CPMuMoE(6, 3, (4, 5), rank=2)
    z = torch.randn(7, 6)
    a = [torch.full((7, 4), 0.25), torch.full((7, 5), 0.2)]
    with pytest.raises(ValueError, match="in_features=6"):
        layer(torch.randn(7, 5), a)
    with pytest.raises(ValueError, match="coefficients"):
        layer(z, a[:1])
    with pytest.raises(ValueError, match=r"coefficients\[1\].*5"):
        layer(z, [a[0], torch.full((7, 4), 0.25)])
    with pytest.raises(ValueError, match="one row per input token"):
        layer(z, [a[0][:3], a[1][:3]])
    with pytest.raises(ValueError, match="x: expected last dimension in_features=8"):
        MuMoEBlock(8, 16, 4, "cp", rank=2)(torch.randn(3, 7))
    with pytest.raises(TypeError, match="z"):
        layer([[1.0] * 6], a)


# ------------------------------------------------------------------------------------------
# CP by ALS
# ------------------------------------------------------------------------------------------
def test_cp_als_recovers_an_exact_low_rank_tensor():
    torch.manual_seed(0)
    factors = [torch.randn(6, 3, dtype=D64), torch.randn(7, 3, dtype=D64), torch.randn(5, 3, dtype=D64)]
    x = cp_to_tensor(factors)
    fit, errors = cp_als(x, rank=3, n_iter=200, tol=1e-14)  # converges in about 60 sweeps
    assert errors[-1] < 1e-6
    torch.testing.assert_close(cp_to_tensor(fit), x, rtol=1e-5, atol=1e-5)
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))  # ALS never increases the error


def test_cp_als_error_falls_with_rank_and_keeps_dtype():
    torch.manual_seed(0)
    x = torch.randn(8, 10, 6)
    errs = [cp_als(x, r, n_iter=20)[1][-1] for r in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]
    fit, _ = cp_als(x, 4, n_iter=5)
    assert [f.shape for f in fit] == [(8, 4), (10, 4), (6, 4)] and fit[0].dtype == torch.float32
    with pytest.raises(ValueError, match="rank"):
        cp_als(x, 0)
    with pytest.raises(ValueError, match="tensor"):
        cp_als(torch.randn(5), 2)


@pytest.mark.gpu
def test_layers_on_cuda_match_cpu():
    torch.manual_seed(0)
    for fac, kw in (("cp", dict(rank=8)), ("tr", dict(ranks=(4, 4, 8)))):
        block = MuMoEBlock(32, 64, (8, 8) if fac == "cp" else 64, fac, **kw)
        x = torch.randn(50, 32)
        want = block(x)
        got = block.cuda()(x.cuda())
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
