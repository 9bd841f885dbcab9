"""Expert scores side by side (frequency, router probability, activation, REAP), the super-expert
check, a global budget across layers, and router-only recovery."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moe_course.compress.distillation import recover_routers
from moe_course.compress.pruning import SCORES, prune_experts, score_experts, super_experts
from moe_course.compress.trimming import drop_experts
from moe_course.layers import SparseMoE, moe_layers
from moe_course.train import TrainConfig


class TwoLayer(nn.Module):
    def __init__(self, d=16, h=32, e=6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, d)
        self.a = SparseMoE(d, e, h, k=2)
        self.b = SparseMoE(d, e, h, k=2)
        self.head = nn.Linear(d, 12)
        with torch.no_grad():  # positive inputs, so that a gate row of -100 is never chosen
            self.emb.weight.abs_()
            self.a.experts.w_out.mul_(0.01)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.a(x)
        return self.head(x + self.b(x))


def ids(n=256, seed=0):
    return torch.randint(0, 12, (n, 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("criterion", SCORES)
def test_scores_have_one_value_per_expert(criterion):
    s = score_experts(TwoLayer(), ids(), criterion)
    assert [t.shape for t in s] == [torch.Size([6])] * 2 and all(torch.all(t >= 0) for t in s)
    if criterion in ("frequency", "router_prob"):
        assert all(abs(float(t.sum()) - 1) < 1e-5 for t in s)


def test_reap_is_gate_weighted_activation():
    model = TwoLayer()
    with torch.no_grad():
        moe_layers(model)[0].experts.w_out[3] *= 50  # expert 3 writes far more
    act, reap = (score_experts(model, ids(), c)[0] for c in ("activation", "reap"))
    assert int(act.argmax()) == 3 and int(reap.argmax()) == 3
    assert torch.all(reap <= act + 1e-6)  # gate weights are at most 1


def test_an_expert_nobody_uses_scores_zero_and_goes_first():
    model = TwoLayer()
    with torch.no_grad():
        moe_layers(model)[0].router.gate.weight[5] = -100.0  # never chosen
    for c in ("frequency", "activation", "reap"):
        assert float(score_experts(model, ids(), c)[0][5]) == 0.0
        assert 5 not in moe_layers(prune_experts(model, 5, calib=ids(), method=c))[0].pruned_experts


def test_global_budget_keeps_the_total_and_at_least_k_per_layer():
    model = TwoLayer()
    with torch.no_grad():
        moe_layers(model)[1].router.gate.weight[:4] = -100.0  # layer b uses two experts only
    out = drop_experts(model, 6, calib=ids(), scope="global", criterion="reap")
    sizes = [layer.num_experts for layer in moe_layers(out)]
    assert sum(sizes) == 6 and min(sizes) >= 2 and sizes[0] > sizes[1]
    with pytest.raises(ValueError, match="criterion"):
        drop_experts(model, 6, calib=ids(), scope="global", criterion="naee")


def test_super_experts_finds_a_planted_outlier_and_nothing_in_a_plain_model():
    model = TwoLayer()
    assert super_experts(model, ids()) == []
    busiest = int(score_experts(model, ids(), "frequency")[1].argmax())
    with torch.no_grad():
        moe_layers(model)[1].experts.w_out[busiest, :, 0] *= 200
    hits = super_experts(model, ids())
    assert hits[0][:2] == (1, busiest) and hits[0][3] >= 10
    with pytest.raises(ValueError, match="factor"):
        super_experts(model, ids(), factor=0.5)


def test_recover_routers_trains_only_the_routers():
    import datasets

    from moe_course.models import LMConfig, model_from_config

    torch.manual_seed(0)
    teacher = model_from_config(LMConfig(d_model=16, n_layers=2, n_heads=2, num_experts=4, k=2, d_hidden=16,
                                         context_length=8, vocab_size=11))
    rows = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 11, (32, 9)).tolist()}).with_format("torch")
    student = prune_experts(teacher, 3, calib=rows, method="reap")
    before = {n: p.clone() for n, p in student.named_parameters()}
    recover_routers(student, teacher, rows, cfg=TrainConfig(steps=3, batch_size=8, warmup_steps=0, eval_every=0),
                    progress=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".router." in f".{n}" for n in changed)
    assert all(p.requires_grad for p in student.parameters())
    assert len(student.kd_history.train_loss) == 3
