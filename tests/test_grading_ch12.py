"""Chapter 12 checkers: the reference passes, typical mistakes are caught with their hint; the
whole-method check (12.3) both ways on the chapter's Mixtral. Mutants: tests/mutants/ch12.py."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run

if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
    import transformers  # noqa: F401  CI installs the [hf] extra
else:
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'moe-course[hf]'); "
                                               "chapter 12 needs it")

from moe_course.grading import ch12  # noqa: E402
from moe_course.grading.core import FAIL, PASS  # noqa: E402

import mutants.ch12 as m12  # noqa: E402
from mutants import WRONG, RIGHT  # noqa: E402

FAST = ("check_course_stacks", "check_memory_gib")


def stacks(gate_up, down):
    f = gate_up.shape[1] // 2
    return gate_up[:, :f].transpose(1, 2), gate_up[:, f:].transpose(1, 2), down.transpose(1, 2)


def test_stacks_reference_passes():
    assert run(ch12.check_course_stacks, stacks).status == PASS


def test_stacks_match_the_bridge():
    """The reference is what moe_course.hf.from_hf builds (as views) from a Mixtral block."""
    transformers = pytest.importorskip("transformers")
    from moe_course import hf

    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    ex = model.model.layers[0].mlp.experts
    layer = hf.from_hf(model).model.layers[0].mlp
    for got, want in zip(stacks(ex.gate_up_proj, ex.down_proj), (layer.experts.w_gate, layer.experts.w_in,
                                                                   layer.experts.w_out)):
        assert torch.equal(got, want)


def test_memory_reference_passes():
    result = run(ch12.check_memory_gib, m12.memory_by_formula)
    assert result.status == PASS, result.message


def test_memory_answer():
    # Mixtral-8x7B: 46.7 B parameters, 45.1 B of them in experts: about 28 GiB at 4-bit experts, bf16 rest
    gib = m12.memory_by_formula(dict(ch12.MIXTRAL_8X7B), 4)
    assert abs(gib - ch12._reference_gib(dict(ch12.MIXTRAL_8X7B), 4)) < 1e-9 and 27 < gib < 29


@pytest.mark.parametrize("entry", [e for e in WRONG if e.check_id.split(".")[1] in FAST and
                                   e.check_id.startswith("ch12")], ids=lambda e: e.id)
def test_fast_mutants_are_caught_with_their_hint(entry):
    result = getattr(ch12, entry.check_id.split(".")[1])(entry.fn, quiet=True)
    assert result.status == FAIL, result.message
    assert all(w.lower() in result.message.lower() for w in entry.hint), result.message


@pytest.mark.parametrize("entry", [e for e in RIGHT if e.check_id.split(".")[1] in FAST and
                                   e.check_id.startswith("ch12")], ids=lambda e: e.id)
def test_fast_alternatives_pass(entry):
    result = getattr(ch12, entry.check_id.split(".")[1])(entry.fn, quiet=True)
    assert result.status == PASS, result.message


@pytest.mark.slow
def test_disk_recipe_both_ways():
    """The whole method on the chapter's Mixtral: NAEE + the chapter 11 recipe passes, experts-only fails."""
    assert run(ch12.check_disk_recipe, m12.recipe_pipeline).status == PASS
    weak = run(ch12.check_disk_recipe, m12.recipe_experts_only)
    assert weak.status == FAIL and "quantize_rest" in weak.message
