"""moe_course.metrics: sizes, bytes, active compute, latency, routing statistics, comparison."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from moe_course import metrics, zoo
from moe_course.layers import SoftMoE, SparseMoE, moe_layers

V, D, H, E, K, L = 11, 16, 24, 8, 2, 2


class TinyLM(nn.Module):
    """Embedding -> Linear -> L residual SparseMoE layers -> head (optionally tied)."""

    def __init__(self, num_experts=E, k=K, n_layers=L, tie=True, **moe_kwargs):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)
        self.moes = nn.ModuleList(SparseMoE(D, num_experts, H, k=k, **moe_kwargs) for _ in range(n_layers))
        self.head = nn.Linear(D, V, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.proj(self.emb(ids))
        for moe in self.moes:
            x = x + moe(x)
        return self.head(x)


def lm_data(n=40, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, t + 1), generator=g)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyLM()


# ---------------------------------------------------------------------------------------- size
def test_size_report_counts_tied_weights_once(model):
    untied = TinyLM(tie=False)
    rep, rep_untied = metrics.size_report(model), metrics.size_report(untied)
    moe = L * (E * D + E * 2 * D * H)
    assert rep.total_params == V * D + (D * D + D) + moe
    assert rep_untied.total_params == rep.total_params + V * D
    assert rep.bytes == 4 * rep.total_params
    assert rep_untied.bytes == rep.bytes + 4 * V * D
    assert rep.expert_params == L * E * 2 * D * H
    assert rep.router_params == L * E * D
    assert rep.non_expert_params == rep.total_params - rep.expert_params


def test_bytes_follow_dtype_and_buffers(model):
    full = metrics.size_report(model)
    assert full.bytes_by_dtype == {"float32": full.bytes}
    model.half()
    half = metrics.size_report(model)
    assert half.bytes * 2 == full.bytes
    assert half.total_params == full.total_params
    assert half.bytes_by_dtype == {"float16": half.bytes}

    model.register_buffer("codes", torch.zeros(100, dtype=torch.uint8))
    model.register_buffer("view", model.proj.weight.data[:2])  # a view: no new storage
    with_buf = metrics.size_report(model)
    assert with_buf.bytes == half.bytes + 100
    assert with_buf.bytes_by_dtype["uint8"] == 100
    assert with_buf.buffer_bytes == 100
    assert with_buf.total_params == full.total_params


def test_packed_experts_keep_logical_param_count(model):
    before = metrics.size_report(model)
    experts = model.moes[0].experts
    for name in ("w_in", "w_out"):  # what a quantizer does: uint8 codes instead of fp32 weights
        shape = getattr(experts, name).shape
        delattr(experts, name)
        experts.register_buffer(name, torch.zeros(shape, dtype=torch.uint8))
    after = metrics.size_report(model)
    assert after.total_params == before.total_params
    assert after.expert_params == before.expert_params
    per_layer = E * 2 * D * H
    assert after.bytes == before.bytes - 3 * per_layer  # 4 bytes -> 1 byte per weight
    assert after.bytes_by_dtype["uint8"] == per_layer


@pytest.mark.parametrize("num_shared", [0, 1])
def test_active_params_and_flops_closed_form(num_shared):
    m = TinyLM(num_shared_experts=num_shared)
    rep = metrics.size_report(m)
    expert = 2 * D * H
    per_layer = E * D + K * expert + num_shared * expert
    # Kaplan non-embedding counting: the embedding and the head tied to it are not active
    # parameters, but the tied head is still a D x V matmul: 2 * V * D FLOPs per token.
    assert rep.active_params_per_token == (D * D + D) + L * per_layer
    assert rep.flops_per_token == 2 * D * D + L * 2 * per_layer + 2 * V * D
    assert rep.embedding_params == V * D
    assert rep.active_params_per_token < rep.total_params
    assert rep.shared_expert_params == L * num_shared * expert
    assert rep.active_params_per_token == (D * D + D) + sum(x.active_params_per_token() for x in moe_layers(m))


def test_tied_lm_head_costs_flops_like_an_untied_one():
    tied, untied = metrics.size_report(TinyLM(tie=True)), metrics.size_report(TinyLM(tie=False))
    assert tied.flops_per_token == untied.flops_per_token  # the same matmul either way
    assert untied.total_params - tied.total_params == V * D  # only the storage differs


def test_course_lm_counts_its_functional_tied_head():
    models_mod = pytest.importorskip("moe_course.models")
    cfg, _ = zoo.preset_configs("test", "shakespeare-moe")
    m = models_mod.model_from_config(cfg)
    rep = metrics.size_report(m)
    d, V_, L_, n = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.context_length
    c = 3 if cfg.activation == "swiglu" else 2
    a_moe = d * cfg.num_experts + cfg.k * c * d * cfg.d_hidden
    assert rep.flops_per_token == L_ * (8 * d * d + 2 * a_moe + 2 * n * d) + 2 * V_ * d
    no_flag = metrics.size_report(type("NoHead", (type(m),), {"tied_lm_head": False})(cfg))
    assert rep.flops_per_token - no_flag.flops_per_token == 2 * V_ * d


def test_attention_term_uses_config_context():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D)

    class WithAttention(TinyLM):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleList(Attention() for _ in range(L))
            self.config = type("Cfg", (), {"context_length": 32, "d_model": D})()

    m = WithAttention()
    rep = metrics.size_report(m)
    assert rep.attention_flops_per_token == 2 * L * 32 * D
    assert rep.context_length == 32
    base = metrics.size_report(TinyLM()).flops_per_token
    assert rep.flops_per_token == base + L * 2 * 3 * D * D + 2 * L * 32 * D
    assert metrics.size_report(m, context_length=64).attention_flops_per_token == 2 * L * 64 * D
    assert metrics.size_report(TinyLM()).attention_flops_per_token == 0


def test_size_report_renders(model):
    rep = metrics.size_report(model)
    text, page = str(rep), rep._repr_html_()
    assert "parameters" in text and "active params" in text and "<table>" in page
    d = rep.to_dict()
    assert d["total_params"] == rep.total_params and d["non_expert_params"] == rep.non_expert_params


def test_format_helpers():
    assert metrics.format_bytes(512) == "512 B"
    assert metrics.format_bytes(1_500_000) == "1.5 MB"
    assert metrics.format_bytes(2 * 1024**2, binary=True) == "2 MiB"
    assert metrics.format_count(1_234_567) == "1.23 M"
    assert metrics.format_count(12) == "12"
    with pytest.raises(ValueError, match="n"):
        metrics.format_bytes(-1)


def test_size_report_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        metrics.size_report("not a model")


# ------------------------------------------------------------------------------------- latency
def test_latency_positive_and_ordered(model):
    ids = lm_data(2, t=4)[:, :-1]
    model.train()
    res = metrics.latency(model, ids, repeats=5, warmup=1)
    assert res.median_ms > 0 and res.p10_ms > 0
    assert res.p10_ms <= res.median_ms <= res.p90_ms
    assert res.tokens == ids.numel() and res.tokens_per_s > 0
    assert len(res.times_ms) == 5
    assert model.training  # mode restored
    dict_res = metrics.latency(model, {"input_ids": lm_data(2, t=4)}, repeats=2, warmup=0)
    assert dict_res.tokens == ids.numel()
    fn_res = metrics.latency(None, lambda: model(ids), repeats=2, warmup=0, tokens=ids.numel())
    assert fn_res.median_ms > 0 and fn_res.tokens_per_s > 0


@pytest.mark.parametrize("repeats", [0, -3, 1.5])
def test_latency_rejects_bad_repeats(model, repeats):
    with pytest.raises(ValueError, match="repeats"):
        metrics.latency(model, lm_data(2), repeats=repeats)


# -------------------------------------------------------------------------------- routing stats
def _direct_counts(model, batches):
    """Counts from the layers' own last_routing after each forward (the reference)."""
    counts = [torch.zeros(E, dtype=torch.long) for _ in moe_layers(model)]
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(b)
            for c, layer in zip(counts, moe_layers(model)):
                c += torch.bincount(layer.last_routing.indices.reshape(-1), minlength=E)
    return counts


def test_routing_stats_frequencies_match_direct_counts(model):
    inputs = lm_data(40)[:, :-1]  # a bare tensor is the model's input, chunked by rows
    model.train()
    model.proj.eval()  # a mixed mode must come back exactly
    stats = metrics.routing_stats(model, inputs, batch_size=16)
    assert not model.proj.training
    assert all(m.training for m in model.modules() if m is not model.proj)
    for layer in moe_layers(model):
        assert len(layer._forward_hooks) == 0
    assert len(stats) == L and stats.num_batches == 3
    expected = _direct_counts(model, inputs.split(16))
    for s, c in zip(stats.layers, expected):
        assert torch.equal(s.counts, c)
        assert s.frequency.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(s.frequency, c.float() / c.sum())
        assert s.num_tokens == 40 * 9
        assert s.mean_prob.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert s.logits.shape == (40 * 9, E) and s.indices.shape == (40 * 9, K)
        assert s.dropped_fraction == 0.0
        assert s.load_cv == pytest.approx((c.double().std(unbiased=False) / c.double().mean()).item())
        assert 0 <= s.normalized_entropy <= 1
        cos = s.coselection
        assert torch.equal(cos, cos.T) and torch.equal(cos.diagonal(), s.counts)
        assert int(cos.sum() - cos.diagonal().sum()) == s.num_tokens * K * (K - 1)


def test_routing_stats_restores_modes_and_hooks_on_error(model):
    model.train()
    model.proj.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    bad = [lm_data(4), torch.full((4, 5), V + 100)]  # second batch: out-of-vocabulary ids
    with pytest.raises(IndexError):
        metrics.routing_stats(model, bad)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(len(layer._forward_hooks) == 0 for layer in moe_layers(model))


def test_routing_stats_dataset_dropping_and_frame():
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    m = TinyLM(capacity_factor=0.5)
    ds = datasets.Dataset.from_dict({"input_ids": lm_data(20).tolist()}).with_format("torch")
    stats = metrics.routing_stats(m, ds, batch_size=8, max_batches=2, max_tokens=50)
    assert stats.num_batches == 2 and stats.num_tokens == 16 * 9
    s = stats.layers[0]
    assert s.logits.shape == (50, E) and s.gate_weights.shape == (50, K)
    assert 0 < s.dropped_fraction < 1  # capacity 0.5 must drop about half
    frame = stats.to_frame()
    assert list(frame.columns) == ["layer", "expert", "frequency", "mean_prob", "counts"]
    assert len(frame) == L * E
    assert frame.groupby("layer")["frequency"].sum().tolist() == pytest.approx([1.0] * L)
    assert list(stats.summary().index) == list(range(L))


def test_routing_stats_soft_moe_and_classifier_batches():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, D)
            self.moe = SoftMoE(D, 4, H)

        def forward(self, x):
            return self.moe(self.inp(x))

    stats = metrics.routing_stats(Classifier(), [{"x": torch.randn(6, 4), "y": torch.zeros(6)}])
    s = stats.layers[0]
    assert s.k == 4 and s.num_tokens == 6
    assert torch.allclose(s.frequency, torch.full((4,), 0.25))  # every expert, every token


def test_routing_stats_errors(model):
    with pytest.raises(ValueError, match="no MoE layers"):
        metrics.routing_stats(nn.Linear(3, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="data"):
        metrics.routing_stats(model, [])
    with pytest.raises(ValueError, match="batch_size"):
        metrics.routing_stats(model, lm_data(4), batch_size=0)
    with pytest.raises(TypeError, match="data"):
        metrics.routing_stats(model, 3)


# ------------------------------------------------------------------------------------- compare
def test_compare_columns_and_ratios(model):
    smaller = TinyLM(num_experts=4)
    data = lm_data(8)
    calls = []

    def evaluate(m, d):
        calls.append(m)
        return {"loss": 1.0 if m is model else 1.5, "accuracy": 0.5 if m is model else 0.4}

    df = metrics.compare({"base": model, "pruned": smaller}, data, evaluate_fn=evaluate,
                         latency_batch=data[:, :-1], repeats=2)
    assert list(df.columns) == ["params", "size (MB)", "active params/token", "FLOPs/token", "× smaller",
                                "loss", "accuracy", "Δ accuracy", "latency (ms)", "× faster"]
    assert list(df.index) == ["base", "pruned"] and len(calls) == 2
    base, pruned = metrics.size_report(model), metrics.size_report(smaller)
    assert df.loc["pruned", "× smaller"] == pytest.approx(base.bytes / pruned.bytes)
    assert df.loc["base", "× smaller"] == pytest.approx(1.0)
    assert df.loc["pruned", "Δ accuracy"] == pytest.approx(-0.1)
    assert df.attrs["quality_metric"] == "accuracy"
    assert (df["latency (ms)"] > 0).all()
    plain = metrics.compare({"base": model})
    assert list(plain.columns) == ["params", "size (MB)", "active params/token", "FLOPs/token", "× smaller"]
    with pytest.raises(ValueError, match="models"):
        metrics.compare({})


def test_compare_with_default_evaluate_on_zoo_models():
    models_mod = pytest.importorskip("moe_course.models")
    datasets = pytest.importorskip("datasets")
    cfg, _ = zoo.preset_configs("test", "shakespeare-moe")
    torch.manual_seed(0)
    m = models_mod.model_from_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (6, cfg.context_length + 1))
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    df = metrics.compare({"lm": m}, ds, batch_size=4)
    assert df.attrs["quality_metric"] == "perplexity"
    assert math.isfinite(df.loc["lm", "perplexity"])
    rep = metrics.size_report(m)
    assert rep.context_length == cfg.context_length
    assert rep.attention_flops_per_token == 2 * cfg.n_layers * cfg.context_length * cfg.d_model


def test_latency_race_interleaves_and_the_verdict_respects_the_noise():
    import time as _time

    from moe_course.metrics import latency_race, speedup_verdict

    order = []
    slow = lambda: (order.append("slow"), _time.sleep(0.004))  # noqa: E731
    fast = lambda: (order.append("fast"), _time.sleep(0.0005))  # noqa: E731
    res = latency_race({"slow": slow, "fast": fast}, None, rounds=6, warmup=0)
    assert list(res) == ["slow", "fast"] and res["slow"].repeats == 6
    assert order[:4] == ["slow", "fast", "fast", "slow"]  # the order rotates every round
    assert speedup_verdict(res["slow"], res["fast"]).endswith("x faster")
    assert speedup_verdict(res["fast"], res["slow"]).endswith("x slower")
    assert speedup_verdict(res["slow"], res["slow"]) == "no measurable difference"


def test_latency_race_times_models_on_one_batch():
    from moe_course.metrics import latency_race

    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    res = latency_race({"a": a, "b": b}, torch.randn(4, 8), rounds=3, warmup=1)
    assert all(r.median_ms > 0 and len(r.times_ms) == 3 for r in res.values())
    with pytest.raises(TypeError, match="models"):
        latency_race({}, torch.randn(4, 8))
