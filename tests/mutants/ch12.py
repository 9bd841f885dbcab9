"""Chapter 12: transformers' expert layout as the course's stacks, a Mixtral config's memory, a
compression of the chapter's Mixtral that survives the file round trip."""

from __future__ import annotations

from . import Chapter

M = Chapter("ch12")


# ------------------------------------------------------------------ 12.1 course_stacks
@M.right("check_course_stacks")
def stacks_chunk_permute(gate_up, down):
    """torch.chunk along the rows, then permute."""
    gate, up = gate_up.chunk(2, dim=1)
    return gate.permute(0, 2, 1), up.permute(0, 2, 1), down.permute(0, 2, 1)


@M.wrong("check_course_stacks", "swapped")
def stacks_swapped(gate_up, down):
    """The up half taken as the gate."""
    f = gate_up.shape[1] // 2
    return gate_up[:, f:].transpose(1, 2), gate_up[:, :f].transpose(1, 2), down.transpose(1, 2)


@M.wrong("check_course_stacks", "interleaved")
def stacks_interleaved(gate_up, down):
    """Even rows as the gate, odd rows as the up projection."""
    return gate_up[:, 0::2].transpose(1, 2), gate_up[:, 1::2].transpose(1, 2), down.transpose(1, 2)


@M.wrong("check_course_stacks", "reshape")
def stacks_reshaped(gate_up, down):
    """reshape instead of transpose."""
    n, two_f, d = gate_up.shape
    f = two_f // 2
    return gate_up[:, :f].reshape(n, d, f), gate_up[:, f:].reshape(n, d, f), down.transpose(1, 2)


@M.wrong("check_course_stacks", "down_proj", "transpose")
def stacks_down_untransposed(gate_up, down):
    """down_proj returned as it is."""
    f = gate_up.shape[1] // 2
    return gate_up[:, :f].transpose(1, 2), gate_up[:, f:].transpose(1, 2), down


@M.wrong("check_course_stacks", "transpose each expert")
def stacks_no_transpose(gate_up, down):
    """The halves without the transpose."""
    f = gate_up.shape[1] // 2
    return gate_up[:, :f], gate_up[:, f:], down.transpose(1, 2)


@M.wrong("check_course_stacks", "down_proj", "reshape")
def stacks_down_reshaped(gate_up, down):
    """down_proj reshaped to [N, f, d]."""
    n, d, f = down.shape
    return gate_up[:, :f].transpose(1, 2), gate_up[:, f:].transpose(1, 2), down.reshape(n, f, d)


# ------------------------------------------------------------------ 12.2 memory_gib
def _gib(cfg, expert_bits, group_size=32, rest_bytes=2, *, scale=True, gib=True, router=True, gqa=True, norms=True,
         head=True, tie_aware=True, active=False):
    d, f, L, N = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_local_experts"]
    v, h = cfg["vocab_size"], cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] if gqa else h
    hd = d // h
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    rest = v * d + L * (attn + (N * d if router else 0) + (2 * d if norms else 0)) + (d if norms else 0)
    if head and not (tie_aware and cfg["tie_word_embeddings"]):
        rest += v * d
    experts = L * N * 3 * d * f
    if active:
        experts = experts * cfg["num_experts_per_tok"] // N
    bits = expert_bits + (24 / group_size if scale else 0)
    return (experts * bits / 8 + rest * rest_bytes) / (2**30 if gib else 1e9)


@M.right("check_memory_gib")
def memory_by_formula(cfg, expert_bits, group_size=32, rest_bytes=2):
    """The parameter count written out term by term."""
    return _gib(cfg, expert_bits, group_size, rest_bytes)


@M.wrong("check_memory_gib", "scale", "zero point")
def memory_no_scales(cfg, expert_bits, group_size=32, rest_bytes=2):
    """expert_bits per weight, scales and zero points forgotten."""
    return _gib(cfg, expert_bits, group_size, rest_bytes, scale=False)


@M.wrong("check_memory_gib", "2**30")
def memory_gigabytes(cfg, expert_bits, group_size=32, rest_bytes=2):
    """Divided by 1e9."""
    return _gib(cfg, expert_bits, group_size, rest_bytes, gib=False)


@M.wrong("check_memory_gib", "router")
def memory_no_router(cfg, expert_bits, group_size=32, rest_bytes=2):
    """No router weights."""
    return _gib(cfg, expert_bits, group_size, rest_bytes, router=False)


@M.wrong("check_memory_gib", "num_key_value_heads")
def memory_no_gqa(cfg, expert_bits, group_size=32, rest_bytes=2):
    """k_proj and v_proj as wide as q_proj."""
    return _gib(cfg, expert_bits, group_size, rest_bytes, gqa=False)


@M.wrong("check_memory_gib", "rmsnorm")
def memory_no_norms(cfg, expert_bits, group_size=32, rest_bytes=2):
    """Norm weights left out."""
    return _gib(cfg, expert_bits, group_size, rest_bytes, norms=False)


@M.wrong("check_memory_gib", "untied", "output layer")
def memory_no_head(cfg, expert_bits, group_size=32, rest_bytes=2):
    """The output layer never counted."""
    return _gib(cfg, expert_bits, group_size, rest_bytes, head=False)


@M.wrong("check_memory_gib", "all n experts")
def memory_active_only(cfg, expert_bits, group_size=32, rest_bytes=2):
    """Only the k active experts counted."""
    return _gib(cfg, expert_bits, group_size, rest_bytes, active=True)


# ------------------------------------------------------------------ 12.3 compress (whole method)
@M.right("check_disk_recipe")
def recipe_pipeline(model, calib):
    """NAEE keeps 7 of 8 experts, then 3-bit experts, 4-bit attention, 8-bit embeddings, as a pipeline."""
    from moe_course.compress import recipes

    steps = [("prune", {"keep": 7, "method": "naee"}), ("quantize", {"bits": 3, "group_size": 32}),
             ("quantize_rest", {"bits": 4, "group_size": 32, "embedding_bits": 8})]
    return recipes.pipeline(model, steps, calib=calib).model


@M.wrong("check_disk_recipe", "7.5x", "expert drop")
def recipe_chapter_11(model, calib):
    """The chapter's recipe as it stands: 3-bit experts, 4-bit attention, 8-bit embeddings."""
    from moe_course.compress import quantization

    m = quantization.quantize(model, 3, group_size=32)
    return quantization.quantize_rest(m, 4, group_size=32, embedding_bits=8)


@M.wrong("check_disk_recipe", "quantize_rest")
def recipe_experts_only(model, calib):
    """Only the experts quantized: the rest stays fp32."""
    from moe_course.compress import quantization

    return quantization.quantize(model, 4, group_size=32)


@M.wrong("check_disk_recipe", "budget")
def recipe_two_bit(model, calib):
    """2 bits everywhere."""
    from moe_course.compress import quantization

    m = quantization.quantize(model, 2, group_size=32)
    return quantization.quantize_rest(m, 2, group_size=32, embedding_bits=2)


@M.wrong("check_disk_recipe", "cannot be saved")
def recipe_layer_drop(model, calib):
    """An MoE layer dropped (Mixtral's config cannot express it), then quantized."""
    from moe_course.compress import quantization, trimming

    m = trimming.drop_layers(model, len(model.blocks) - 1, calib=calib)
    m = quantization.quantize(m, 4, group_size=32)
    return quantization.quantize_rest(m, 4, group_size=32, embedding_bits=8)


@M.wrong("check_disk_recipe", "bridged")
def recipe_plain_transformers(model, calib):
    """Returns to_hf(...) of an expert drop: a plain transformers model."""
    from moe_course import hf
    from moe_course.compress import trimming

    return hf.to_hf(trimming.drop_experts(model, 6, calib=calib))


@M.wrong("check_disk_recipe", "7.5x", "full precision")
def recipe_fake_quant(model, calib):
    """Fake-quantized in place: dense fp32 tensors, nothing smaller on disk."""
    import torch

    import copy

    from moe_course.compress.quantization import fake_quantize
    from moe_course.layers import moe_layers

    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moe_layers(model):
            for name in ("w_in", "w_gate", "w_out"):
                w = getattr(layer.experts, name)
                w.copy_(fake_quantize(w, 4, granularity="group", group_size=32))
    return model
