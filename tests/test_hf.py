"""The transformers bridge (moe_course.hf) on tiny random models of every supported architecture,
built offline from configs: equal logits, storage sharing, to_hf round trips through
save_pretrained/from_pretrained after compression, the packed quantized format, and every
compression function of the course on a bridged model (technique x architecture)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
    import transformers  # CI installs the [hf] extra: a missing transformers fails here, not skips
else:
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'moe-course[hf]'); the bridge is optional")

from moe_course import hf  # noqa: E402
from moe_course.compress import lowrank, merging, pruning, quantization, recipes, trimming  # noqa: E402
from moe_course.layers import Experts, TopKRouter, moe_layers  # noqa: E402
from moe_course.metrics import size_report  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(arch: str):
    t = transformers
    if arch == "mixtral":
        return t.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if arch == "qwen2_moe":  # shared expert wider than the routed ones, with its sigmoid gate
        return t.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                num_experts=4, num_experts_per_tok=2, **COMMON)
    if arch == "qwen3_moe":
        return t.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=True, head_dim=8, **COMMON)
    if arch == "olmoe":
        return t.OlmoeConfig(intermediate_size=24, num_experts=4, num_experts_per_tok=2, **COMMON)
    if arch == "deepseek_v2":  # a dense first layer, 2 shared experts, a routed scaling factor
        return t.DeepseekV2Config(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=2,
                                  num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=1.5,
                                  **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4})
    if arch == "granitemoe":
        return t.GraniteMoeConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    raise KeyError(arch)


ARCHS = list(hf.ARCHITECTURES)
_MODELS: dict[str, torch.nn.Module] = {}


def original(arch: str) -> torch.nn.Module:
    """A tiny random transformers model (cached; tests must not change it)."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = transformers.AutoModelForCausalLM.from_config(_config(arch)).eval()
    return _MODELS[arch]


def ids(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


CALIB = [{"input_ids": ids(4, 17, seed=s)} for s in range(3)]  # the course's training format [B, T+1]
PROBE = ids(2, 9, seed=42)


@torch.no_grad()
def logits(model, x=PROBE) -> torch.Tensor:
    return model(input_ids=x).logits


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# from_hf: equal logits, shared storage
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_from_hf_equal_logits_every_dispatch_and_token_count(arch):
    m = original(arch)
    b = hf.from_hf(m)
    assert hf.is_bridged(b) and not hf.is_bridged(m)
    assert len(moe_layers(b)) == (2 if arch == "deepseek_v2" else 2) and not moe_layers(m)
    for shape in ((1, 1), (2, 7), (1, 64)):
        x = ids(*shape, seed=sum(shape))
        ref = logits(m, x)
        for strategy in ("naive", "loop", "grouped", "auto"):
            for layer in moe_layers(b):
                layer.dispatch = strategy
            close(logits(b, x), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_from_hf_shares_storage_and_leaves_the_original_alone(arch):
    m = original(arch)
    spec = hf.ARCHITECTURES[arch]
    blocks = [getattr(layer, spec.block) for layer in m.model.layers]
    blocks = [blk for blk in blocks if hasattr(blk, "experts")]
    b = hf.from_hf(m)
    for layer, blk in zip(moe_layers(b), blocks):
        ptr = blk.experts.gate_up_proj.untyped_storage().data_ptr()
        for w in (layer.experts.w_in, layer.experts.w_gate):
            assert w.untyped_storage().data_ptr() == ptr  # a view, no copy
        assert layer.experts.w_out.untyped_storage().data_ptr() == blk.experts.down_proj.untyped_storage().data_ptr()
        assert layer.router.gate.weight is getattr(blk, spec.router).weight  # the same parameter
        if spec.shared_gate:
            assert layer.shared_gate is getattr(blk, spec.shared_gate).weight
        if spec.shared:
            mlp = getattr(blk, spec.shared)
            assert layer.shared.w_in.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    assert b.lm_head.weight is m.lm_head.weight
    # the bridged model is a new tree: the original still runs transformers' own blocks
    assert all(hasattr(blk, "experts") and type(blk).__module__.startswith("transformers") for blk in blocks)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_fused_gate_up_fast_path_equals_the_course_dispatch(arch):
    """At inference the untouched bridged experts run gate and up as one grouped_mm (as transformers
    does); it computes what the course's dispatch computes, and steps aside once experts are copied."""
    from moe_course.dispatch import dispatch

    layer = moe_layers(hf.from_hf(original(arch)))[0]
    x = torch.randn(40, layer.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        r = layer.router(x)
        fast = layer._fused_grouped(x, r)
        assert fast is not None
        close(fast, dispatch(x, r.weights, r.indices, layer.experts, "grouped"))
        assert copy.deepcopy(layer)._fused_grouped(x, r) is None  # its own storage per tensor now
    assert layer._fused_grouped(x, r) is None  # gradients wanted: the course's dispatch


def test_from_hf_generates_like_the_original():
    m = original("mixtral")
    b = hf.from_hf(m)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(b.generate(ids(1, 5), **kw), m.generate(ids(1, 5), **kw))


def test_from_hf_refuses_what_it_cannot_bridge():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(NotImplementedError, match="no bridge for config.model_type='llama'"):
        hf.from_hf(transformers.AutoModelForCausalLM.from_config(cfg))
    b = hf.from_hf(original("olmoe"))
    with pytest.raises(ValueError, match="already bridged"):
        hf.from_hf(b)
    with pytest.raises(TypeError, match="expected a model returned by moe_course.hf.from_hf"):
        hf.to_hf(original("olmoe"))
    with pytest.raises(ValueError, match="dispatch: expected one of"):
        hf.from_hf(original("olmoe"), dispatch="fast")


# ------------------------------------------------------------------------------------------------
# to_hf and save_pretrained -> from_pretrained
# ------------------------------------------------------------------------------------------------
def _reload(model, tmp_path: Path, name: str):
    path = tmp_path / name
    hf.to_hf(model).save_pretrained(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), path


@pytest.mark.parametrize("arch", ARCHS)
def test_to_hf_is_the_original_again_without_copies(arch):
    m = original(arch)
    h = hf.to_hf(hf.from_hf(m))
    assert type(h) is type(m) and not hf.is_bridged(h)
    close(logits(h), logits(m), tol=0)
    spec = hf.ARCHITECTURES[arch]
    for a, b in zip(m.model.layers, h.model.layers):
        blk_a, blk_b = getattr(a, spec.block), getattr(b, spec.block)
        if hasattr(blk_a, "experts"):
            assert type(blk_b) is type(blk_a)
            assert blk_b.experts.gate_up_proj.data_ptr() == blk_a.experts.gate_up_proj.data_ptr()
            assert blk_b.experts.down_proj.data_ptr() == blk_a.experts.down_proj.data_ptr()


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_after_expert_drop_merge_and_block_drop(arch, tmp_path):
    b = hf.from_hf(original(arch))
    spec = hf.ARCHITECTURES[arch]
    dropped = trimming.drop_experts(b, 3, calib=CALIB)
    merged = merging.merge_experts(b, 2, calib=CALIB)
    fewer = trimming.drop_blocks(b, len(b.blocks) - 1, calib=CALIB)
    for model, name in ((dropped, "drop"), (merged, "merge"), (fewer, "blocks")):
        back, path = _reload(model, tmp_path, name)
        close(logits(back), logits(model))
        if name == "drop":
            assert getattr(back.config, spec.num_experts) == 3
            assert all(getattr(getattr(l, spec.block), spec.router).weight.shape[0] == 3
                       for l in back.model.layers if hasattr(getattr(l, spec.block), "experts"))
        if name == "merge":  # every router slot gets a copy of its group's expert
            assert getattr(back.config, spec.num_experts) == 4
        if name == "blocks":
            assert back.config.num_hidden_layers == original(arch).config.num_hidden_layers - 1
            # the KV cache after block drop: renumbered layers generate like the bridged model
            kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(back.generate(ids(1, 4), **kw), model.generate(ids(1, 4), **kw))
        # and back through the bridge
        again = hf.from_pretrained(path)
        close(logits(again), logits(model))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_roundtrip_after_layer_drop(arch, tmp_path):
    b = hf.from_hf(original(arch))
    fewer = trimming.drop_layers(b, len(moe_layers(b)) - 1, calib=CALIB)
    assert len(moe_layers(fewer)) == 1 and len(moe_layers(b)) == 2
    if arch == "mixtral":
        with pytest.raises(ValueError, match=r"drop_layers\(\) removed the MoE block of decoder layers \[\d\]; "
                                             r"transformers' MixtralConfig cannot express"):
            hf.to_hf(fewer)
        return
    back, _ = _reload(fewer, tmp_path, "layers")
    assert back.config.intermediate_size == 0 and len(back.config.mlp_only_layers) == 1
    close(logits(back), logits(fewer))
    fewer.save_pretrained(tmp_path / "direct")  # a bridged model's own save_pretrained goes through the bridge
    close(logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "direct")), logits(fewer))


def test_inplace_bridging_and_back():
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(_config("olmoe")).eval()
    ref = logits(m)
    b = hf.from_hf(m, inplace=True)
    assert b is m and hf.is_bridged(m) and len(moe_layers(m)) == 2
    h = hf.to_hf(m, inplace=True)
    assert h is m and not hf.is_bridged(m) and not moe_layers(m)
    close(logits(m), ref, tol=0)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_quantized_experts_packed_format_is_smaller_and_loads(arch, tmp_path):
    b = hf.from_hf(original(arch))
    q = quantization.quantize(b, 4, group_size=8)
    with pytest.raises(ValueError, match=r"MoE layer \d+ was compressed by quantize\(\) \(QuantizedExperts\)"):
        hf.to_hf(q)
    dense = hf.to_hf(q, materialize=True)  # dequantized dense tensors: same function
    close(logits(dense), logits(q))
    dense.save_pretrained(tmp_path / "dense")
    hf.save_pretrained(q, tmp_path / "packed")
    expert_params = sum(l.experts.num_experts * l.experts.params_per_expert for l in moe_layers(q))
    saved = _dir_bytes(tmp_path / "dense") - _dir_bytes(tmp_path / "packed")
    # 4-bit codes + an fp16 scale and a uint8 zero per 8 weights: 7 bits instead of 32 (+ headers)
    assert saved > 0.7 * expert_params * (32 - 7) / 8
    # plain transformers finds no model.safetensors and fails (5.25 raises a TypeError from its file
    # lookup) instead of loading freshly initialised experts with a warning
    with pytest.raises((OSError, TypeError, ValueError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    back = hf.from_pretrained(tmp_path / "packed")
    assert all(type(l.experts).__name__ == "QuantizedExperts" for l in moe_layers(back))
    close(logits(back), logits(q))
    # merged, then quantized: each group stored once, the router's slot map restored
    mq = quantization.quantize(merging.merge_experts(b, 2, calib=CALIB), 4, group_size=8, targets="all")
    hf.save_pretrained(mq, tmp_path / "merged")
    back = hf.from_pretrained(tmp_path / "merged")
    assert all(isinstance(l.router, merging.MergedRouter) and l.experts.num_experts == 2 for l in moe_layers(back))
    close(logits(back), logits(mq))


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe"])
def test_to_hf_names_the_step_it_cannot_express(arch):
    b = hf.from_hf(original(arch))
    cases = [
        (lambda: pruning.skip_experts(b, calib=CALIB), r"SkippingRouter \(from skip_experts\(\)\)"),
        (lambda: trimming.drop_experts(b, 5, calib=CALIB, scope="global"), r"scope='global'"),
        (lambda: lowrank.lowrank_experts(b, 4), r"lowrank_experts\(\) \(LowRankExperts\)"),
        (lambda: merging.mc_smoe(b, 2, calib=CALIB, rank=4, keep_sparse=0.1), r"mc_smoe\(\)"),
        (lambda: quantization.quantize_rest(b, 8), r"quantize\(targets='all'\) or quantize_rest\(\)"),
    ]
    for make, message in cases:
        model = make()
        with pytest.raises(ValueError, match=message):
            hf.to_hf(model)
    lr = lowrank.lowrank_experts(b, 4)
    close(logits(hf.to_hf(lr, materialize=True)), logits(lr))


# ------------------------------------------------------------------------------------------------
# every compression function on a bridged model (technique x architecture)
# ------------------------------------------------------------------------------------------------
TECHNIQUES = {  # name: (function of the bridged model, whether true bytes must shrink)
    "prune_magnitude": (lambda m: pruning.prune_magnitude(m, 0.5), False),
    "prune_experts": (lambda m: pruning.prune_experts(m, 2, calib=CALIB), True),
    "prune_experts_naee": (lambda m: pruning.prune_experts(m, 3, calib=CALIB, method="naee"), True),
    "skip_experts": (lambda m: pruning.skip_experts(m, calib=CALIB), False),
    "quantize": (lambda m: quantization.quantize(m, 4, group_size=8), True),
    "quantize_all": (lambda m: quantization.quantize(m, 4, group_size=8, targets="all"), True),
    "quantize_rest": (lambda m: quantization.quantize_rest(m, 8), True),
    "lowrank": (lambda m: lowrank.lowrank_experts(m, 2), True),
    "share": (lambda m: lowrank.share_experts(m, 1), True),
    "align": (lambda m: merging.align_experts(m, calib=CALIB), False),
    "merge": (lambda m: merging.merge_experts(m, 2, calib=CALIB), True),
    "hc_smoe": (lambda m: merging.hc_smoe(m, 2, calib=CALIB), True),
    "mc_smoe": (lambda m: merging.mc_smoe(m, 2, calib=CALIB, rank=2, keep_sparse=0.05), True),
    "drop_experts": (lambda m: trimming.drop_experts(m, 3, calib=CALIB), True),
    "drop_layers": (lambda m: trimming.drop_layers(m, len(moe_layers(m)) - 1, calib=CALIB), True),
    "drop_blocks": (lambda m: trimming.drop_blocks(m, len(m.blocks) - 1, calib=CALIB), True),
}
_BRIDGED: dict[str, torch.nn.Module] = {}


def bridged(arch: str) -> torch.nn.Module:
    if arch not in _BRIDGED:
        _BRIDGED[arch] = hf.from_hf(original(arch))
    return _BRIDGED[arch]


def _router_tensors(model):
    for layer in moe_layers(model):
        yield layer.router.gate.weight
        if getattr(layer, "shared_gate", None) is not None:
            yield layer.shared_gate


@pytest.mark.parametrize("technique", list(TECHNIQUES))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_compression_function_on_a_bridged_model(arch, technique):
    model = bridged(arch)
    before = logits(model)
    fn, shrinks = TECHNIQUES[technique]
    out = fn(model)
    assert out is not model and hf.is_bridged(out)
    close(logits(model), before, tol=0)  # the input is untouched
    y = logits(out)
    assert y.shape == before.shape and bool(torch.isfinite(y).all())
    size_in, size_out = size_report(model), size_report(out)
    if shrinks:
        assert size_out.bytes < size_in.bytes, (size_in.bytes, size_out.bytes)
    else:  # zeros in dense tensors, a permutation, a skip threshold (a few bytes of buffers)
        assert size_out.bytes <= size_in.bytes + 64
    if technique == "align":  # a permutation of hidden units: the same function
        close(y, before)
    for w in _router_tensors(out):  # routers (and Qwen's shared-expert gate) stay full precision
        assert isinstance(w, torch.nn.Parameter) and w.dtype == torch.float32
    assert all(type(layer.router) in (TopKRouter, pruning.SkippingRouter, merging.MergedRouter)
               for layer in moe_layers(out))
    if technique.startswith("quantize") and technique != "quantize_rest":
        # the silent-skip bug of nn.Linear-only quantizers: no routed expert may stay dense
        for layer in moe_layers(out):
            assert type(layer.experts) is quantization.QuantizedExperts
            assert not any(p.is_floating_point() and p.dim() == 3 for p in layer.experts.parameters())
            if technique == "quantize_all" and layer.shared is not None:
                assert type(layer.shared) is quantization.QuantizedExperts
        assert size_out.expert_bytes < size_in.expert_bytes * 7.5 / 32
    if technique in ("quantize_all", "quantize_rest"):
        dense_linears = [n for n, mod in out.named_modules() if type(mod) is torch.nn.Linear and ".router." not in n]
        assert not dense_linears, dense_linears  # every Linear outside the routers is packed


def test_distill_recovers_a_bridged_student():
    """Knowledge distillation (course's distill/fit) through the logits wrapper: a bridged student
    after expert drop moves towards its bridged teacher."""
    datasets = pytest.importorskip("datasets")
    from moe_course.compress.distillation import kd_loss, train_student
    from moe_course.train import TrainConfig

    teacher = bridged("qwen3_moe")
    student = trimming.drop_experts(teacher, 2, calib=CALIB)
    rows = ids(64, 17, seed=7)
    data = datasets.Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    x, y = rows[:, :-1], rows[:, 1:]

    def gap():
        return float(kd_loss(logits(student, x), logits(teacher, x), y, 2.0, 1.0))

    before = gap()
    train_student(hf.logits_only(student), hf.logits_only(teacher), data,
            cfg=TrainConfig(steps=15, batch_size=16, lr=1e-3, warmup_steps=1, weight_decay=0.0, eval_every=0, eval_batches=1),
            alpha=1.0, progress=False)
    assert gap() < 0.9 * before  # trained in place, towards the teacher
    assert hf.is_bridged(student) and all(type(l.experts) is Experts for l in moe_layers(student))


# ------------------------------------------------------------------------------------------------
# shared experts left in full precision are named (chapter 12)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_quantizing_routed_experts_only_names_the_unquantized_shared_experts(arch, tmp_path):
    model = bridged(arch)
    q = quantization.quantize(model, 4, group_size=8)  # targets="experts": shared experts stay fp32
    names = hf.unquantized_shared_experts(q)
    assert names and all(n.startswith("model.layers.") for n in names)
    with pytest.warns(UserWarning, match=r"shared experts of model\.layers\.\d+\.mlp.*targets='all'"):
        logits(q)  # the first forward in eval mode names them
    with pytest.warns(UserWarning, match="stay in full precision") as record:
        hf.save_pretrained(q, tmp_path / "q")
    assert all(n in str(record[0].message) for n in names)
    everything = quantization.quantize(model, 4, group_size=8, targets="all")
    assert hf.unquantized_shared_experts(everything) == []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        logits(everything)
        logits(quantization.quantize(bridged("mixtral"), 4, group_size=8))  # no shared experts: silent
