"""Checkers for chapter 12, a real checkpoint: the transformers expert layout mapped to the
course's stacks, a config's memory, and a whole compression of the chapter's Mixtral that
survives ``save_pretrained`` / ``from_pretrained``.

Each checker compares the learner's function with a reference (:mod:`moe_course.hf`'s views,
:func:`moe_course.hf_zoo.param_counts` counted on the ``meta`` device) and recognises the usual
wrong answers so that the hint names the mistake.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from .core import CheckFailed, checker, describe, expect

__all__ = ["check_course_stacks", "check_memory_gib", "check_disk_recipe", "MIXTRAL_8X7B", "DISK_RATIO",
           "PPL_BUDGET"]


# --------------------------------------------------------------------------------------------
# Exercise 12.1: gate_up_proj / down_proj -> w_gate, w_in, w_out
# --------------------------------------------------------------------------------------------
def _reference_stacks(gate_up: torch.Tensor, down: torch.Tensor):
    inter = gate_up.shape[1] // 2
    return (gate_up[:, :inter].transpose(1, 2), gate_up[:, inter:].transpose(1, 2), down.transpose(1, 2))


def _stack_cases():
    g = torch.Generator().manual_seed(12)
    return [(torch.randn(n, 2 * f, d, generator=g), torch.randn(n, d, f, generator=g), (n, d, f))
            for n, d, f in ((4, 6, 5), (3, 8, 8), (8, 16, 12), (1, 4, 7))]


@checker("Exercise 12.1: transformers' expert layout as the course's stacks")
def check_course_stacks(course_stacks) -> None:
    for gate_up, down, (n, d, f) in _stack_cases():
        desc = f"(N={n}, d={d}, f={f})"
        got = course_stacks(gate_up.clone(), down.clone())
        expect(isinstance(got, (tuple, list)) and len(got) == 3,
               f"return a tuple (w_gate, w_in, w_out), got {describe(got)}")
        w_gate, w_in, w_out = (torch.as_tensor(t) for t in got)
        ref_gate, ref_in, ref_out = _reference_stacks(gate_up, down)
        for name, w, want in (("w_gate", w_gate, (n, d, f)), ("w_in", w_in, (n, d, f)), ("w_out", w_out, (n, f, d))):
            if tuple(w.shape) != want:
                hint = ""
                if name != "w_out" and tuple(w.shape) == (n, f, d):
                    hint = ": transpose each expert's rows (gate_up_proj is [N, 2f, d], nn.Linear style y = x W^T)"
                if name == "w_out" and tuple(w.shape) == (n, d, f):
                    hint = ": down_proj is [N, d, f]; the course's w_out is [N, f, d], transpose it"
                raise CheckFailed(f"{name} has shape {tuple(w.shape)}, expected {want} {desc}{hint}")
        top, bottom = gate_up[:, :f].transpose(1, 2), gate_up[:, f:].transpose(1, 2)
        if torch.equal(w_gate, bottom) and torch.equal(w_in, top):
            raise CheckFailed(f"w_gate and w_in are swapped: the FIRST f rows of gate_up_proj are the gate "
                              f"projection, the last f rows the up projection {desc}")
        even, odd = gate_up[:, 0::2].transpose(1, 2), gate_up[:, 1::2].transpose(1, 2)
        if torch.equal(w_gate, even) or torch.equal(w_in, odd):
            raise CheckFailed(f"you split gate_up_proj into interleaved rows: it is concatenated, the first f rows "
                              f"are the gate and the next f the up projection (split at f) {desc}")
        if not torch.equal(w_gate, ref_gate) or not torch.equal(w_in, ref_in):
            if torch.equal(w_gate, gate_up[:, :f].reshape(n, d, f)) or torch.equal(w_in, gate_up[:, f:].reshape(n, d, f)):
                raise CheckFailed(f"you reshaped where a transpose is needed: reshape keeps the memory order and "
                                  f"scrambles the rows; use .transpose(1, 2) {desc}")
            raise CheckFailed(f"w_gate / w_in do not hold gate_up_proj's halves transposed {desc}")
        if not torch.equal(w_out, ref_out):
            if torch.equal(w_out, down.reshape(n, f, d)):
                raise CheckFailed(f"w_out: you reshaped down_proj where a transpose is needed; use "
                                  f"down_proj.transpose(1, 2) {desc}")
            raise CheckFailed(f"w_out is not down_proj transposed (down_proj [N, d, f] -> w_out [N, f, d]) {desc}")
    # the mapping computes the same experts: y = W_down (silu(W_gate x) * W_up x)
    gate_up, down, (n, d, f) = _stack_cases()[2]
    w_gate, w_in, w_out = (torch.as_tensor(t) for t in course_stacks(gate_up, down))
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(1))
    for e in range(n):
        hf_y = (torch.nn.functional.silu(x @ gate_up[e, :f].T) * (x @ gate_up[e, f:].T)) @ down[e].T
        ours = (torch.nn.functional.silu(x @ w_gate[e]) * (x @ w_in[e])) @ w_out[e]
        expect(torch.allclose(ours, hf_y, atol=1e-5), f"expert {e} computes something else than transformers' expert")


# --------------------------------------------------------------------------------------------
# Exercise 12.2: memory of a Mixtral-style config
# --------------------------------------------------------------------------------------------
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    tie_word_embeddings=False)


def _counts(fields: dict) -> tuple[int, int]:
    """(routed expert parameters, all other parameters) of a Mixtral config, counted by transformers."""
    from moe_course import hf_zoo

    c = hf_zoo.param_counts({"model_type": "mixtral", **fields})
    return c["experts"], c["rest"]


def _reference_gib(fields: dict, expert_bits: int, group_size: int = 32, rest_bytes: int = 2) -> float:
    experts, rest = _counts(fields)
    return (experts * (expert_bits + 24 / group_size) / 8 + rest * rest_bytes) / 2**30


def _memory_cases():
    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    tied = {**small, "tie_word_embeddings": True, "num_key_value_heads": 4, "num_local_experts": 4}
    return [(small, 4, 32, 2), (tied, 3, 64, 4), (small, 8, 16, 2), (MIXTRAL_8X7B, 4, 32, 2)]


def _variants(fields: dict, bits: int, g: int, rb: int) -> dict[str, float]:
    """Wrong answers, computed from the true counts."""
    d, v, L, N = fields["hidden_size"], fields["vocab_size"], fields["num_hidden_layers"], fields["num_local_experts"]
    hd = d // fields["num_attention_heads"]
    experts, rest = _counts(fields)
    eb = bits + 24 / g
    gib = lambda e, r, eb=eb: (e * eb / 8 + r * rb) / 2**30  # noqa: E731
    out = {
        "scale": gib(experts, rest, bits),
        "2**30": (experts * eb / 8 + rest * rb) / 1e9,
        "router": gib(experts, rest - L * N * d),
        "key_value": gib(experts, rest + 2 * L * d * hd * (fields["num_attention_heads"] - fields["num_key_value_heads"])),
        "norm": gib(experts, rest - (2 * L + 1) * d),
        "k of N": gib(experts * fields["num_experts_per_tok"] // N, rest),
    }
    if fields["tie_word_embeddings"]:
        out["tie"] = gib(experts, rest + v * d)
    else:
        out["lm_head"] = gib(experts, rest - v * d)
    return out


_HINTS = {
    "scale": "count the fp16 scale and uint8 zero point of every group: expert_bits + 24/group_size bits per weight",
    "2**30": "a GiB is 2**30 bytes, not 1e9",
    "router": "you left out the router W_g [N, d] of every layer (it stays at rest_bytes)",
    "key_value": "k_proj and v_proj have num_key_value_heads * head_dim outputs (grouped-query attention), "
                 "not hidden_size",
    "norm": "count the RMSNorm weights: two per layer (d each) plus the final norm",
    "k of N": "memory holds ALL N experts; only the compute uses k of them",
    "lm_head": "an untied output layer (tie_word_embeddings=False) is its own [vocab, d] matrix",
    "tie": "with tie_word_embeddings=True the output layer IS the embedding: count it once",
}


@checker("Exercise 12.2: the memory of a Mixtral-style config")
def check_memory_gib(memory_gib) -> None:
    for fields, bits, g, rb in _memory_cases():
        desc = f"(d={fields['hidden_size']}, layers={fields['num_hidden_layers']}, N={fields['num_local_experts']}, " \
               f"{bits}-bit experts, groups of {g}, rest {rb} bytes)"
        got = memory_gib(dict(fields), bits, g, rb)
        expect(isinstance(got, (int, float)) or (torch.is_tensor(got) and got.numel() == 1),
               f"return a number of GiB, got {describe(got)}")
        got = float(got)
        want = _reference_gib(fields, bits, g, rb)
        if abs(got - want) <= 1e-6 * max(1.0, want):
            continue
        for key, value in _variants(fields, bits, g, rb).items():
            if abs(got - value) <= 1e-6 * max(1.0, value):
                raise CheckFailed(f"{_HINTS[key]} {desc}: you gave {got:.6g} GiB, expected {want:.6g}")
        raise CheckFailed(f"{desc}: you gave {got:.6g} GiB, expected {want:.6g} (embeddings, q/k/v/o, router, "
                          f"experts 3 d f each, norms, output layer)")
    ans = _reference_gib(MIXTRAL_8X7B, 4)
    print(f"Mixtral-8x7B with 4-bit experts (groups of 32) and a bf16 rest: {ans:.2f} GiB of weights")


# --------------------------------------------------------------------------------------------
# Exercise 12.3: a compression of the chapter's Mixtral that survives the file round trip
# --------------------------------------------------------------------------------------------
DISK_RATIO = 7.5   # at least this much smaller on disk than the fp32 checkpoint
PPL_BUDGET = 2.0   # at most this % higher validation perplexity
_VAL_BLOCKS = 64


def _setup():
    from moe_course import hf, hf_zoo, zoo

    lm = hf_zoo.shakespeare_mixtral("cpu")
    splits = zoo.data("shakespeare-moe", "cpu")
    calib = [{"input_ids": splits["train"][i * 16:(i + 1) * 16]["input_ids"]} for i in range(4)]
    val = splits["validation"].select(range(_VAL_BLOCKS))
    return hf.from_hf(lm), calib, val


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


@checker("Exercise 12.3: 7.5x smaller on disk, at most +2 % perplexity, reloadable", timeout=600)
def check_disk_recipe(compress) -> None:
    from moe_course import hf
    from moe_course.train import evaluate

    import transformers

    transformers.utils.logging.disable_progress_bar()
    bridged, calib, val = _setup()
    ppl = lambda m: evaluate(hf.logits_only(m), val, batch_size=64)["perplexity"]  # noqa: E731
    out = compress(copy.deepcopy(bridged), calib)
    expect(hf.is_bridged(out), f"return the compressed bridged model (from hf.from_hf and the course's functions), "
                               f"got {describe(out)}")
    x = torch.stack([val[i]["input_ids"][:-1] for i in range(4)])
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(bridged, Path(tmp) / "base")
        try:
            hf.save_pretrained(out, Path(tmp) / "mine")
        except ValueError as err:
            raise CheckFailed(f"your model cannot be saved: {err}") from None
        ratio = _disk(Path(tmp) / "base") / _disk(Path(tmp) / "mine")
        back = hf.from_pretrained(Path(tmp) / "mine")
        with torch.no_grad():
            diff = (back(input_ids=x).logits - out(input_ids=x).logits).abs().max().item()
    expect(diff < 1e-4, f"the reloaded model's logits differ from the saved one's by {diff:.3g}")
    p0, p1 = ppl(bridged), ppl(out)
    cost = 100 * (p1 / p0 - 1)
    print(f"on disk {ratio:.2f}x smaller than fp32; perplexity {p0:.3f} -> {p1:.3f} ({cost:+.2f} %)")
    dense = [n for n, m in out.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Embedding)
             and ".router" not in n and ".gate" not in n]
    if dense:
        how = (f"the experts are not all of the model: {dense[0]} and {len(dense) - 1} more layers are still "
               "full precision; quantize the attention, embeddings and head too (quantize_rest)")
    else:
        how = ("everything is quantized already: remove parameters too (expert drop with the chapter's best "
               "score) or use fewer bits where it hurts least")
    expect(ratio >= DISK_RATIO, f"the files are {ratio:.2f}x smaller, the target is {DISK_RATIO:g}x: {how}")
    expect(cost <= PPL_BUDGET, f"perplexity rose by {cost:.2f} %, the budget is {PPL_BUDGET:g} %: drop less "
                               "(fewer experts or blocks removed) or use more bits where it hurts (the embeddings)")
