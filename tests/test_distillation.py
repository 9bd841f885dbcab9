"""compress.distillation: the KD loss's math, its argument checks, and train_student() on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_course.compress.distillation import (gain_preserved, init_from_teacher, kd_loss, make_student,
                                              soft_targets, train_student)
from moe_course.data import load_mnist1d
from moe_course.models import ClassifierConfig, LMConfig, model_from_config
from moe_course.train import TrainConfig


def test_kd_loss_matches_hinton_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    T, a = 3.0, 0.3
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    soft = (p * (p.log() - q.log())).sum(-1).mean() * T * T
    want = a * soft + (1 - a) * F.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, T, a), want, atol=1e-6)


def test_kd_loss_zero_when_equal_and_lm_shape_flattens():
    x = torch.randn(2, 4, 7)
    assert float(kd_loss(x, x.clone())) == pytest.approx(0.0, abs=1e-6)
    y = torch.randint(0, 7, (2, 4))
    assert torch.allclose(kd_loss(x, x * 2, y), kd_loss(x.reshape(8, 7), (x * 2).reshape(8, 7), y.reshape(8)))


def test_kd_loss_alpha_extremes_and_gradient_only_to_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    assert torch.allclose(kd_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    kd_loss(s, t, y, alpha=1.0).backward()
    assert s.grad is not None and t.grad is None


def test_t_squared_keeps_gradient_scale():
    # Hinton et al. 2015: for large T the soft gradient ~ (z_s - z_t)/(N T^2) * T^2, independent of T.
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 10, generator=g) * 0.1, torch.randn(16, 10, generator=g) * 0.1
    norms = []
    for T in (10.0, 40.0):
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, temperature=T).backward()
        norms.append(float(x.grad.norm()))
    assert norms[0] == pytest.approx(norms[1], rel=0.1)


@pytest.mark.parametrize("kwargs, word", [({"temperature": 0}, "temperature"), ({"temperature": -1.0}, "temperature"),
                                          ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha")])
def test_kd_loss_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), **kwargs)


def test_kd_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="labels"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(3, dtype=torch.long))


def test_soft_targets_and_gain_preserved():
    p = soft_targets(torch.tensor([[2.0, 0.0]]), 2.0)
    assert torch.allclose(p, torch.softmax(torch.tensor([[1.0, 0.0]]), -1))
    assert gain_preserved(0.97, 0.95, 0.99) == pytest.approx(0.5)
    assert gain_preserved(9.0, 10.0, 6.0) == pytest.approx(0.25)  # perplexity: lower is better, same formula
    with pytest.raises(ValueError, match="baseline"):
        gain_preserved(1.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        soft_targets(torch.zeros(2), 0.0)


@pytest.fixture(scope="module")
def mnist():
    ds = load_mnist1d(num_samples=600)
    return {"train": ds["train"], "validation": ds["test"]}


def tiny_teacher():
    torch.manual_seed(0)
    return model_from_config(ClassifierConfig(d_model=16, n_layers=1, n_heads=2, num_experts=4, k=2, d_hidden=16))


def test_make_student_and_init_from_teacher():
    t = tiny_teacher()
    s = make_student(t, num_experts=2)
    assert s.config.num_experts == 2 and t.config.num_experts == 4
    copied = init_from_teacher(s, t)
    assert copied and not any(".ffn." in f".{n}" for n in copied)
    tp = dict(t.named_parameters())
    for n in copied:
        assert torch.equal(dict(s.named_parameters())[n], tp[n])
    dense = make_student(t, ffn="dense", d_hidden=t.config.k * t.config.d_hidden)
    assert init_from_teacher(dense, t)


def test_train_student_trains_it_in_place_and_leaves_teacher_alone(mnist):
    t = tiny_teacher()
    t.eval()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    s = make_student(t, num_experts=2)
    init_from_teacher(s, t)
    s0 = {k: v.clone() for k, v in s.state_dict().items()}
    cfg = TrainConfig(steps=5, batch_size=32, warmup_steps=1, eval_every=0, eval_batches=2)
    trained = train_student(s, t, mnist, cfg=cfg, temperature=2.0, alpha=0.5, progress=False)
    assert trained is s                                          # training: the student itself, trained in place
    h = s.kd_history
    assert len(h.train_loss) == 5 and all(math.isfinite(x) for x in h.train_loss)
    assert h.final_eval is not None and "accuracy" in h.final_eval
    assert "aux" in h.train_metrics[0] and h.train_metrics[0]["aux"] > 0  # student's MoE aux loss included
    assert all(torch.equal(v, before[k]) for k, v in t.state_dict().items())
    assert not t.training and all(p.requires_grad for p in t.parameters())
    assert any(not torch.equal(v, s0[k]) for k, v in s.state_dict().items())


def test_train_student_lm_and_bad_arguments():
    cfg_m = LMConfig(d_model=16, n_layers=1, n_heads=2, num_experts=4, k=2, d_hidden=16, context_length=8,
                     vocab_size=11)
    torch.manual_seed(0)
    t = model_from_config(cfg_m)
    s = make_student(t, ffn="dense", d_hidden=32)
    import datasets

    rows = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 11, (8, 9)).tolist()}).with_format("torch")
    h = train_student(s, t, rows, cfg=TrainConfig(steps=2, batch_size=4, warmup_steps=1, eval_every=0),
                      progress=False).kd_history
    assert len(h.train_loss) == 2
    with pytest.raises(ValueError, match="student"):
        train_student(t, t, rows, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        train_student(s, t, rows, alpha=2.0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_student(s, t, rows.select([]), progress=False)
