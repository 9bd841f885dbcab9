"""moe_course.hf_zoo (chapter 12): memory from a config, tiny random stand-ins of real checkpoints
loaded with from_pretrained and bridged, and the cached Shakespeare Mixtral (test preset)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
    import transformers  # CI installs the [hf] extra
else:
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'moe-course[hf]'); chapter 12 needs it")

from moe_course import hf, hf_zoo  # noqa: E402


def test_param_counts_match_the_published_sizes():
    olmoe = hf_zoo.param_counts("allenai/OLMoE-1B-7B-0125")
    assert round(olmoe["total"] / 1e9, 1) == 6.9 and round(olmoe["active"] / 1e9, 1) == 1.3  # "1B-7B"
    granite = hf_zoo.param_counts("ibm-granite/granite-3.0-1b-a400m")
    assert round(granite["total"] / 1e9, 1) == 1.3 and round(granite["active"] / 1e9, 1) == 0.4  # "1b-a400m"
    # by hand: 16 layers x 64 experts x 3 x 2048 x 1024
    assert olmoe["experts"] == 16 * 64 * 3 * 2048 * 1024 and olmoe["active_experts"] == olmoe["experts"] // 8


def test_memory_table_prices_and_fits():
    rows = {r["variant"]: r for r in hf_zoo.memory_table("allenai/OLMoE-1B-7B-0125")}
    c = hf_zoo.param_counts("allenai/OLMoE-1B-7B-0125")
    assert rows["fp32"]["bytes"] == 4 * c["total"] and rows["bf16"]["bytes"] == 2 * c["total"]
    assert rows["4-bit experts, bf16 rest"]["bytes"] == int(c["experts"] * 4.75 / 8 + 2 * c["rest"])
    assert not rows["bf16"]["fits"] and rows["4-bit experts, bf16 rest"]["fits"]
    assert all(r["fits"] for r in hf_zoo.memory_table("ibm-granite/granite-3.0-1b-a400m")[1:])
    assert all(r["fits"] for r in hf_zoo.memory_table("allenai/OLMoE-1B-7B-0125", gpu_bytes=80 * 2**30))


@pytest.mark.parametrize("model_id", list(hf_zoo.CONFIGS))
def test_tiny_random_checkpoint_is_the_online_code_path(model_id, tmp_path):
    path = hf_zoo.tiny_random_checkpoint(model_id, tmp_path / "tiny", vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.model_type == hf_zoo.CONFIGS[model_id]["model_type"]
    bridged = hf.from_hf(model)
    x = torch.randint(1, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bridged(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert bridged.generate(x[:1], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 15)


@pytest.mark.slow
def test_shakespeare_mixtral_trains_once_then_loads(tmp_path):
    first = hf_zoo.shakespeare_mixtral("test", cache_dir=tmp_path)
    assert type(first).__name__ == "MixtralForCausalLM" and first.zoo_info["source"] == "trained"
    again = hf_zoo.shakespeare_mixtral("test", cache_dir=tmp_path)
    assert again.zoo_info["source"] == "cache"
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    ids = torch.tensor([first.tokenizer.encode("ROMEO:")])
    assert first.tokenizer.decode(first.generate(ids, max_new_tokens=5, do_sample=False)[0].tolist()).startswith("ROMEO:")
    with pytest.raises(ValueError, match="preset"):
        hf_zoo.shakespeare_mixtral("gpu", cache_dir=tmp_path)
