"""Behaviour of the course's models: shapes, causality, losses, configs, presets."""

from __future__ import annotations


import pytest
import torch

from moe_course.layers import SoftMoE, SparseMoE, moe_layers
from moe_course.models import (
    ClassifierConfig,
    DenseFFN,
    LMConfig,
    MoEClassifier,
    MoETransformerLM,
)
from moe_course.zoo import preset_configs as preset
from moe_course.train import TrainConfig


pytestmark = pytest.mark.usefixtures("single_thread")


def small_lm(**kw) -> MoETransformerLM:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=20, context_length=16, d_model=32, n_layers=2, n_heads=4,
                   num_experts=4, k=2, d_hidden=32, **kw)
    return MoETransformerLM(cfg)


def small_classifier(**kw) -> MoEClassifier:
    torch.manual_seed(0)
    cfg = ClassifierConfig(d_model=32, n_layers=2, n_heads=4, num_experts=4, k=2, d_hidden=32, **kw)
    return MoEClassifier(cfg)


@pytest.mark.parametrize("ffn", ["moe", "soft", "dense"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_lm_forward_shape_and_ffn_kind(ffn, activation):
    model = small_lm(ffn=ffn, activation=activation)
    ids = torch.randint(0, 20, (3, 11))
    assert model(ids).shape == (3, 11, 20)
    assert len(model.blocks) == 2
    kinds = {"moe": SparseMoE, "soft": SoftMoE, "dense": DenseFFN}
    assert all(isinstance(b.ffn, kinds[ffn]) for b in model.blocks)
    # a dense baseline must not look like an MoE to compression code
    assert len(moe_layers(model)) == (0 if ffn == "dense" else 2)


def test_lm_is_causal():
    model = small_lm().eval()
    ids = torch.randint(0, 20, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 20
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_lm_rejects_too_long_and_non_integer_input():
    model = small_lm()
    with pytest.raises(ValueError, match="context_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))


def test_lm_head_is_tied_to_embedding():
    model = small_lm()
    with torch.no_grad():
        model.tok_emb.weight[3] += 1.0
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n for n in names)  # no separate output matrix
    ids = torch.randint(0, 20, (1, 5))
    logits = model(ids)
    assert logits.shape[-1] == model.tok_emb.weight.shape[0]


def test_lm_loss_includes_weighted_aux_losses():
    model = small_lm(aux_loss_weight=0.5, z_loss_weight=0.25)
    ids = torch.randint(0, 20, (4, 17))
    loss, metrics = model.compute_loss({"input_ids": ids})
    assert set(metrics) >= {"lm_loss", "balance", "z"}
    layers = moe_layers(model)
    balance = sum(float(l.aux_losses["balance"].detach()) for l in layers)
    z = sum(float(l.aux_losses["z"].detach()) for l in layers)
    assert model.aux_loss().item() == pytest.approx(0.5 * balance + 0.25 * z, rel=1e-5)
    assert loss.item() == pytest.approx(metrics["lm_loss"] + 0.5 * balance + 0.25 * z, rel=1e-5)
    assert metrics["balance"] == pytest.approx(balance / len(layers), rel=1e-5)
    # zero weights: the loss is the cross-entropy alone
    model.config.aux_loss_weight = model.config.z_loss_weight = 0.0
    loss0, m0 = model.compute_loss({"input_ids": ids})
    assert loss0.item() == pytest.approx(m0["lm_loss"], rel=1e-6)


def test_dense_lm_has_zero_aux_loss():
    model = small_lm(ffn="dense")
    loss, metrics = model.compute_loss({"input_ids": torch.randint(0, 20, (2, 9))})
    assert model.aux_loss().item() == 0.0
    assert loss.item() == pytest.approx(metrics["lm_loss"])


def test_lm_overfits_a_tiny_batch():
    model = small_lm()
    batch = {"input_ids": torch.randint(0, 20, (4, 17), generator=torch.Generator().manual_seed(1))}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, metrics = model.compute_loss(batch)
        first = metrics["lm_loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["lm_loss"] < 0.5 * first


def test_every_parameter_gets_a_gradient():
    model = small_lm()
    loss, _ = model.compute_loss({"input_ids": torch.randint(0, 20, (8, 17))})
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_generate_is_seeded_and_respects_context():
    model = small_lm().eval()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = model.generate([1, 2, 3], max_new_tokens=30, temperature=1.0, top_k=5, generator=g1)
    b = model.generate(torch.tensor([1, 2, 3]), max_new_tokens=30, temperature=1.0, top_k=5, generator=g2)
    assert a.shape == (33,) and torch.equal(a, b)  # 33 > context_length: the window slides
    assert a[:3].tolist() == [1, 2, 3]
    greedy = model.generate(torch.tensor([[1, 2], [3, 4]]), max_new_tokens=4, temperature=0)
    assert greedy.shape == (2, 6)
    top1 = model.generate([1, 2], max_new_tokens=4, temperature=1.0, top_k=1, generator=g1)
    assert torch.equal(top1, greedy[0])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate_text("hi")


def test_generate_text_with_a_tokenizer():
    from moe_course.data import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrs")  # 19 chars + <unk> = 20 ids
    model = small_lm()
    model.tokenizer = tok
    text = model.generate_text("abc", max_new_tokens=7, seed=0)
    assert text.startswith("abc") and len(text) == 10
    assert model.generate_text("abc", max_new_tokens=7, seed=0) == text


@pytest.mark.parametrize("mixer", ["conv", "attention", "none"])
@pytest.mark.parametrize("ffn", ["moe", "soft", "dense"])
def test_classifier_shapes_and_loss(mixer, ffn):
    model = small_classifier(mixer=mixer, ffn=ffn)
    x, y = torch.randn(5, 40), torch.randint(0, 10, (5,))
    assert model(x).shape == (5, 10)
    assert all(hasattr(b, "ffn") for b in model.blocks)
    loss, metrics = model.compute_loss({"x": x, "y": y})
    assert set(metrics) == {"ce", "accuracy", "balance", "z"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert loss.item() == pytest.approx(metrics["ce"] + model.aux_loss().item(), rel=1e-5)


def test_classifier_routes_every_position_token():
    model = small_classifier()
    model(torch.randn(3, 40))
    layer = moe_layers(model)[0]
    assert layer.last_routing.indices.shape == (3 * model.config.num_tokens, 2)


def test_classifier_overfits_a_tiny_batch():
    model = small_classifier()
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(32, 40, generator=g), "y": torch.randint(0, 10, (32,), generator=g)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, metrics = model.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["accuracy"] >= 0.9


def test_classifier_input_validation():
    model = small_classifier()
    with pytest.raises(ValueError, match="input_length=40"):
        model(torch.randn(2, 39))
    with pytest.raises(KeyError, match="'x' and 'y'"):
        model.compute_loss({"x": torch.randn(2, 40)})


@pytest.mark.parametrize("cls", [LMConfig, ClassifierConfig])
def test_config_round_trip(cls):
    cfg = cls(d_model=48, n_heads=6, num_experts=6, k=3, capacity_factor=1.25, num_shared_experts=1,
              activation="swiglu", noisy=True)
    d = cfg.to_dict()
    import json

    assert cls.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"k": 9, "num_experts": 8}, "k must be in"),
        ({"n_heads": 5, "d_model": 32}, "n_heads=5"),
        ({"ffn": "sparse"}, "ffn must be one of"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"dropout": 1.0}, "dropout"),
        ({"d_model": 0}, "d_model must be >= 1"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
        ({"dispatch": "fast"}, "dispatch must be one of"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LMConfig(**kwargs)


def test_config_type_errors_and_unknown_keys():
    with pytest.raises(TypeError, match="n_layers must be an int"):
        LMConfig(n_layers=2.0)
    with pytest.raises(ValueError, match=r"unknown LMConfig field\(s\) \['d_ff'\]"):
        LMConfig.from_dict({**LMConfig().to_dict(), "d_ff": 3})
    with pytest.raises(ValueError, match="mixer must be one of"):
        ClassifierConfig(mixer="mlp")
    with pytest.raises(TypeError, match="LMConfig"):
        MoETransformerLM(ClassifierConfig())


@pytest.mark.parametrize("name", ["test", "cpu", "gpu"])
@pytest.mark.parametrize("model", ["shakespeare-moe", "mnist1d-moe"])
def test_presets_build_sparse_moe_models(name, model):
    cfg, train_cfg = preset(name, model)
    assert isinstance(train_cfg, TrainConfig)
    assert isinstance(cfg, LMConfig if model == "shakespeare-moe" else ClassifierConfig)
    assert cfg.ffn == "moe" and cfg.k < cfg.num_experts and cfg.capacity_factor is None
    if name == "cpu":
        assert (cfg.num_experts, cfg.k) == (8, 2)


def test_preset_auto_and_errors(monkeypatch):
    monkeypatch.setenv("MOE_COURSE_DEVICE", "cpu")
    assert preset("auto", "mnist1d-moe") == preset("cpu", "mnist1d-moe")
    with pytest.raises(ValueError, match="'cpu', 'gpu', 'test', 'auto'"):
        preset("tpu", "mnist1d-moe")
    with pytest.raises(ValueError, match="shakespeare-moe"):
        preset("cpu", "gpt2")


def test_presets_are_fresh_objects():
    a, _ = preset("cpu", "mnist1d-moe")
    a.k = 1
    assert preset("cpu", "mnist1d-moe")[0].k == 2


# ------------------------------------------------------------------------------ KV-cache decoding
@pytest.mark.parametrize("prompt_len, new", [(3, 20), (10, 30)])  # the second runs past the context of 24
def test_kv_cache_decoding_gives_the_same_tokens_as_recomputing(prompt_len, new):
    from moe_course.models import LMConfig, MoETransformerLM

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=17, d_model=32, n_layers=2, n_heads=4, num_experts=4, k=2, d_hidden=32,
                   context_length=24, activation="swiglu")
    model = MoETransformerLM(cfg).eval()
    prompt = torch.randint(0, 17, (2, prompt_len))
    cached = model.generate(prompt, max_new_tokens=new, temperature=0)
    plain = model.generate(prompt, max_new_tokens=new, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(prompt, new, temperature=1.0, generator=g1),
                       model.generate(prompt, new, temperature=1.0, generator=g2, use_cache=False))


def test_kv_cache_logits_equal_a_full_forward():
    from moe_course.models import KVCache, LMConfig, MoETransformerLM

    torch.manual_seed(1)
    model = MoETransformerLM(LMConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, num_experts=4, k=2,
                                      d_hidden=16, context_length=16)).eval()
    ids = torch.randint(0, 11, (3, 12))
    full = model(ids)
    cache = KVCache(2)
    parts = [model(ids[:, :5], cache), model(ids[:, 5:6], cache), model(ids[:, 6:9], cache), model(ids[:, 9:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12 and cache.nbytes() == 2 * 2 * 3 * 12 * 16 * 4  # layers x (k, v) x B x T x d x fp32
    with pytest.raises(ValueError, match="after 12 cached positions"):
        model(ids[:, :5], cache)  # 12 + 5 > context_length 16


# ------------------------------------------------------------------ image classifier (digits)
def test_image_classifier_preset_builds_a_sparse_moe_model():
    from moe_course.models import ImageClassifierConfig, MoEImageClassifier, model_from_config

    for name in ("test", "cpu", "gpu"):
        cfg, _ = preset(name, "digits-moe")
        assert isinstance(cfg, ImageClassifierConfig) and cfg.ffn == "moe"
        model = model_from_config(cfg)
        assert isinstance(model, MoEImageClassifier)
        assert len(model.moe_layers()) == cfg.n_layers
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, cfg.num_classes)


def test_image_classifier_config_round_trip_and_tokens():
    from moe_course.models import ImageClassifierConfig

    cfg = ImageClassifierConfig(d_model=16, n_heads=2, stride=3, mixer="attention")
    assert ImageClassifierConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.grid == 3 and cfg.num_tokens == 9
    with pytest.raises(ValueError, match="image_size"):
        ImageClassifierConfig(image_size=0)
