"""fit() and evaluate(): schedule, determinism, metrics, errors."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from moe_course.models import ClassifierConfig, LMConfig, MoEClassifier, MoETransformerLM
from moe_course.train import History, TrainConfig, evaluate, fit, lr_at, param_groups


pytestmark = pytest.mark.usefixtures("single_thread")


def lm_data(n: int = 24, t: int = 16, vocab: int = 12, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    # a learnable pattern: each row counts up modulo vocab from a random start
    starts = rng.integers(0, vocab, size=(n, 1))
    ids = (starts + np.arange(t + 1)) % vocab
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def cls_data(n: int = 64, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    t = np.arange(40)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
    # class = frequency of a noisy sine wave: easy for conv + pooling, impossible by chance
    x = (np.sin(2 * np.pi * (y[:, None] + 1) * t / 40 + phase) + 0.1 * rng.normal(size=(n, 40))).astype(np.float32)
    return datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist()}).with_format("torch")


def tiny_lm(seed: int = 0) -> MoETransformerLM:
    torch.manual_seed(seed)
    return MoETransformerLM(LMConfig(vocab_size=12, context_length=16, d_model=32, n_layers=1, n_heads=2,
                                     num_experts=4, k=2, d_hidden=32))


def tiny_cls(seed: int = 0) -> MoEClassifier:
    torch.manual_seed(seed)
    return MoEClassifier(ClassifierConfig(d_model=16, n_layers=1, n_heads=2, num_experts=4, k=2, d_hidden=16))


FAST = TrainConfig(steps=25, batch_size=8, lr=5e-3, warmup_steps=3, eval_every=10, eval_batches=2, seed=1)


def test_fit_reduces_loss_and_records_history():
    model, data = tiny_lm(), lm_data()
    hist = fit(model, data, data, FAST, progress=False)
    assert isinstance(hist, History)
    assert hist.steps == list(range(25)) and len(hist.train_loss) == len(hist.lr) == 25
    assert np.mean(hist.train_loss[-5:]) < 0.7 * np.mean(hist.train_loss[:3])
    assert hist.eval_steps == [9, 19, 24]  # every 10 steps and at the end
    assert set(hist.final_eval) == {"loss", "perplexity"}
    assert set(hist.train_metrics[0]) >= {"lm_loss", "balance", "z"}
    assert hist.wall_time > 0
    d = hist.to_dict()
    assert d["train_loss"] == hist.train_loss and hist.summary()["steps"] == 25


def test_fit_is_deterministic_for_a_seed():
    a, b = tiny_lm(seed=0), tiny_lm(seed=0)
    data = lm_data()
    fit(a, data, cfg=FAST, progress=False)
    fit(b, data, cfg=FAST, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = tiny_lm(seed=0)
    fit(c, data, cfg=TrainConfig(**{**FAST.to_dict(), "seed": 2}), progress=False)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_fit_leaves_global_rng_and_mode_alone():
    model, data = tiny_lm(), lm_data()
    model.eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, data, cfg=TrainConfig(steps=3, batch_size=8, warmup_steps=1, eval_every=0), progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert not model.training


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y - 1e-12 for x, y in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    model, data = tiny_lm(), lm_data()
    cfg = TrainConfig(steps=12, batch_size=8, lr=1e-3, warmup_steps=4, eval_every=0)
    hist = fit(model, data, cfg=cfg, progress=False)
    assert hist.lr[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_no_weight_decay_on_norms_biases_embeddings():
    model = tiny_lm()
    decay, rest = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) not in decay_ids and id(model.pos_emb.weight) not in decay_ids
    assert id(model.ln_f.weight) not in decay_ids and id(model.blocks[0].mixer.qkv.bias) not in decay_ids
    assert id(model.blocks[0].ffn.experts.w_in) in decay_ids
    assert id(model.blocks[0].mixer.qkv.weight) in decay_ids
    n = sum(p.numel() for g in (decay, rest) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_fit_uses_compute_loss_with_aux_weights():
    model, data = tiny_lm(), lm_data()
    model.config.aux_loss_weight = 10.0
    hist = fit(model, data, cfg=TrainConfig(steps=2, batch_size=8, warmup_steps=1, eval_every=0), progress=False)
    m = hist.train_metrics[0]
    # one MoE layer: loss = CE + 10 * balance + 1e-3 * z
    assert hist.train_loss[0] == pytest.approx(m["lm_loss"] + 10.0 * m["balance"] + 1e-3 * m["z"], rel=1e-5)


def test_callback_sees_metrics_and_can_stop():
    seen = []

    def cb(step, info):
        seen.append((step, dict(info)))
        return step == 4

    hist = fit(tiny_cls(), cls_data(), cls_data(seed=1), FAST, progress=False, callback=cb)
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4] and len(hist.steps) == 5
    assert {"loss", "lr", "ce", "accuracy"} <= set(seen[0][1])


def test_evaluate_lm_perplexity_is_exp_of_token_loss():
    model, data = tiny_lm(), lm_data(n=10)
    model.train()
    out = evaluate(model, data, batch_size=4)
    assert set(out) == {"loss", "perplexity"}
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert model.training  # mode restored
    # equals the cross-entropy over every predicted token, batch size does not matter
    ids = data[:]["input_ids"]
    with torch.no_grad():
        model.eval()
        logits = model(ids[:, :-1])
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 12), ids[:, 1:].reshape(-1)).item()
    assert out["loss"] == pytest.approx(ref, rel=1e-5)
    assert evaluate(model, data, batch_size=3)["loss"] == pytest.approx(ref, rel=1e-5)
    assert evaluate(model, data, batch_size=4, max_batches=1)["loss"] != pytest.approx(ref, rel=1e-9)


def test_evaluate_classifier_and_training_reaches_accuracy():
    model, train, val = tiny_cls(), cls_data(256), cls_data(64, seed=1)
    before = evaluate(model, val)
    fit(model, train, cfg=TrainConfig(steps=60, batch_size=32, lr=1e-2, warmup_steps=5, eval_every=0), progress=False)
    after = evaluate(model, val)
    assert set(after) == {"loss", "accuracy"}
    assert after["accuracy"] > max(0.6, before["accuracy"])


def test_errors_are_clear():
    model = tiny_lm()
    empty = lm_data().select([])
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty)
    with pytest.raises(ValueError, match="train_data is empty"):
        fit(model, empty, progress=False)
    with pytest.raises(TypeError, match="TrainConfig"):
        fit(model, lm_data(), cfg={"steps": 3}, progress=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['epochs'\]"):
        TrainConfig.from_dict({"epochs": 3})
    assert TrainConfig.from_dict(FAST.to_dict()) == FAST
