"""Chapter 5: zero-point quantization with a clipping search, packing 2-bit codes, the learner's quantizer on the
Shakespeare model."""

from __future__ import annotations

import copy

import torch

from . import Chapter

M = Chapter("ch05")


# ------------------------------------------------------------------ 5.1 fake_quant_clipped
RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _clip(w, bits, g, ratios=RATIOS, *, levels=None, rnd=torch.round, clamp=True, score="sse", per="group",
          dtype=None, codes=False, columns=False):
    if columns:
        rows = w.reshape(-1, w.shape[-1])
        return _clip(rows.T.contiguous(), bits, g, ratios).T.reshape(w.shape)
    x = w.reshape(-1, g)
    levels = 2 ** bits - 1 if levels is None else levels
    lo0, hi0 = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    best = err_best = q_best = None
    for r in ratios:
        lo, hi = r * lo0, r * hi0
        s = (hi - lo) / levels
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = rnd(-lo / s)
        q = rnd(x / s) + z
        if clamp:
            q = q.clamp(0, levels)
        xh = (q - z) * s
        err = (xh - x).abs().amax(1, keepdim=True) if score == "max" else (xh - x).pow(2).sum(1, keepdim=True)
        if per == "tensor":
            err = err.sum().expand_as(err)
        if best is None:
            best, err_best, q_best = xh, err, q
        else:
            better = err < err_best
            best, err_best, q_best = (torch.where(better, xh, best), torch.where(better, err, err_best),
                                      torch.where(better, q, q_best))
    out = (q_best if codes else best).reshape(w.shape)
    return out if dtype is None else out.to(dtype)


@M.right("check_fake_quant_clipped")
def clipped_stacked(w, bits, group_size, ratios=RATIOS):
    """All ratios at once on a stacked [R, groups, g] tensor; argmin picks the first minimum."""
    x = w.unflatten(-1, (-1, group_size)).reshape(-1, group_size)
    r = torch.tensor(ratios, dtype=w.dtype)[:, None, None]
    lo = r * torch.minimum(x.amin(-1, keepdim=True), torch.zeros(()))
    hi = r * torch.maximum(x.amax(-1, keepdim=True), torch.zeros(()))
    levels = 2 ** bits - 1
    s = ((hi - lo) / levels).clamp_min(1e-12)
    z = (-lo / s).round()
    xh = (((x / s).round() + z).clamp(0, levels) - z) * s  # [R, groups, g]
    best = (xh - x).pow(2).sum(-1).argmin(0)  # [groups]
    return xh[best, torch.arange(x.shape[0])].reshape(w.shape)


@M.wrong("check_fake_quant_clipped", "not clamped")
def clipped_no_clamp(w, bits, group_size, ratios=RATIOS):
    """Codes not clamped (the clipping never happens)."""
    return _clip(w, bits, group_size, ratios, clamp=False)


@M.wrong("check_fake_quant_clipped", "2**b - 1")
def clipped_levels(w, bits, group_size, ratios=RATIOS):
    """Step (hi - lo) / 2**b."""
    return _clip(w, bits, group_size, ratios, levels=2 ** bits)


@M.wrong("check_fake_quant_clipped", "floor")
def clipped_floor(w, bits, group_size, ratios=RATIOS):
    """floor instead of round."""
    return _clip(w, bits, group_size, ratios, rnd=torch.floor)


@M.wrong("check_fake_quant_clipped", "one ratio for the whole tensor")
def clipped_per_tensor(w, bits, group_size, ratios=RATIOS):
    """One ratio chosen for the whole tensor."""
    return _clip(w, bits, group_size, ratios, per="tensor")


@M.wrong("check_fake_quant_clipped", "squared errors")
def clipped_max_error(w, bits, group_size, ratios=RATIOS):
    """Ratio chosen by the largest absolute error."""
    return _clip(w, bits, group_size, ratios, score="max")


@M.wrong("check_fake_quant_clipped", "codes")
def clipped_returns_codes(w, bits, group_size, ratios=RATIOS):
    """Returns the integer codes q."""
    return _clip(w, bits, group_size, ratios, codes=True)


@M.wrong("check_fake_quant_clipped", "dtype")
def clipped_float64(w, bits, group_size, ratios=RATIOS):
    """Computed and returned in float64."""
    return _clip(w.double(), bits, group_size, ratios)


@M.wrong("check_fake_quant_clipped", "consecutive")
def clipped_columns(w, bits, group_size, ratios=RATIOS):
    """Groups down the columns."""
    return _clip(w, bits, group_size, ratios, columns=True)


@M.wrong("check_fake_quant_clipped", "ratio 1.0")
def clipped_no_search(w, bits, group_size, ratios=RATIOS):
    """The chapter's plain round-to-nearest (no search)."""
    return _clip(w, bits, group_size, (1.0,))


@M.wrong("check_fake_quant_clipped", "s = 0")
def clipped_no_zero_guard(w, bits, group_size, ratios=RATIOS):
    """No guard for s = 0."""
    x = w.reshape(-1, group_size)
    lo0, hi0 = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    levels = 2 ** bits - 1
    best = err_best = None
    for r in ratios:
        s = (r * hi0 - r * lo0) / levels
        z = torch.round(-r * lo0 / s)
        xh = (torch.clamp(torch.round(x / s) + z, 0, levels) - z) * s
        err = (xh - x).pow(2).sum(1, keepdim=True)
        if best is None:
            best, err_best = xh, err
        else:
            better = err < err_best
            best, err_best = torch.where(better, xh, best), torch.where(better, err, err_best)
    return best.reshape(w.shape)


# ------------------------------------------------------------------ 5.2 pack_int2
@M.right("check_pack_int2")
def pack2_multiply(codes):
    """Weighted sum with 1, 4, 16, 64 in int32, cast back."""
    quads = codes.reshape(-1, 4).to(torch.int32)
    return (quads * torch.tensor([1, 4, 16, 64], dtype=torch.int32)).sum(1).to(torch.uint8)


@M.wrong("check_pack_int2", "reversed")
def pack2_reversed(codes):
    """Code 4j in the highest bits."""
    f = codes.reshape(-1)
    return (f[0::4] << 6) | (f[1::4] << 4) | (f[2::4] << 2) | f[3::4]


@M.wrong("check_pack_int2", "without shifting")
def pack2_added(codes):
    """Added without shifts."""
    f = codes.reshape(-1)
    return f[0::4] + f[1::4] + f[2::4] + f[3::4]


@M.wrong("check_pack_int2", "4 bits per code")
def pack2_nibbles(codes):
    """Shifts of 4 bits, as for 4-bit codes."""
    f = codes.reshape(-1).to(torch.int64)
    return (f[0::4] | f[1::4] << 4 | f[2::4] << 8 | f[3::4] << 12).to(torch.uint8)


@M.wrong("check_pack_int2", "one byte per code")
def pack2_nothing(codes):
    """The codes as they are."""
    return codes.reshape(-1).clone()


@M.wrong("check_pack_int2", "1-d")
def pack2_two_dimensional(codes):
    """Bytes returned as a column [n/4, 1]."""
    f = codes.reshape(-1)
    return (f[0::4] | (f[1::4] << 2) | (f[2::4] << 4) | (f[3::4] << 6))[:, None]


@M.wrong("check_pack_int2", "flatten")
def pack2_rows(codes):
    """Slices the first axis (rows) without flattening."""
    return (codes[0::4] | (codes[1::4] << 2) | (codes[2::4] << 4) | (codes[3::4] << 6)).reshape(-1)


@M.wrong("check_pack_int2", "torch.uint8")
def pack2_int64(codes):
    """Returned as int64."""
    f = codes.reshape(-1).long()
    return f[0::4] | (f[1::4] << 2) | (f[2::4] << 4) | (f[3::4] << 6)


@M.wrong("check_pack_int2", "neighbours")
def pack2_quarters(codes):
    """Combines code j with codes j + n/4, j + n/2, j + 3n/4."""
    f = codes.reshape(-1)
    q = f.numel() // 4
    return f[:q] | (f[q:2 * q] << 2) | (f[2 * q:3 * q] << 4) | (f[3 * q:] << 6)


# ------------------------------------------------------------------ 5.3 quantized_copy (use it)
def _qcopy(model, bits, group_size, *, transpose=True, names=("w_in", "w_gate", "w_out"), inplace=False,
           layers=None, router=False):
    from moe_course.layers import moe_layers
    m = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for li, layer in enumerate(moe_layers(m)):
            if layers is not None and li not in layers:
                continue
            for name in names:
                w = getattr(layer.experts, name)
                if w is None:
                    continue
                if transpose:
                    w.copy_(_clip(w.transpose(1, 2), bits, group_size).transpose(1, 2))
                else:
                    w.copy_(_clip(w, bits, group_size))
            if router:
                layer.router.gate.weight.copy_(_clip(layer.router.gate.weight, bits, group_size))
    return m


@M.right("check_quantized_copy")
def qcopy_state_dict(model, bits, group_size):
    """Through a copied state_dict: every key containing 'experts.w_', transposed, quantized, transposed back."""
    m = copy.deepcopy(model)
    sd = m.state_dict()
    for key, w in sd.items():
        if ".experts.w_" in key:
            sd[key] = clipped_stacked(w.transpose(1, 2).contiguous(), bits, group_size).transpose(1, 2)
    m.load_state_dict(sd)
    return m


@M.wrong("check_quantized_copy", "wrong axis")
def qcopy_no_transpose(model, bits, group_size):
    """Groups along the last axis as stored (the output dimension of w_in)."""
    return _qcopy(model, bits, group_size, transpose=False)


@M.wrong("check_quantized_copy", "w_gate")
def qcopy_forgot_gate(model, bits, group_size):
    """w_gate left fp32."""
    return _qcopy(model, bits, group_size, names=("w_in", "w_out"))


@M.wrong("check_quantized_copy", "modified its input")
def qcopy_in_place(model, bits, group_size):
    """Quantizes the input model in place and returns it."""
    _qcopy(model, bits, group_size, inplace=True)
    return copy.deepcopy(model)


@M.wrong("check_quantized_copy", "input model itself")
def qcopy_returns_input(model, bits, group_size):
    """Returns the input object (after quantizing a copy it never returns)."""
    _qcopy(model, bits, group_size)
    return model


@M.wrong("check_quantized_copy", "every moe layer")
def qcopy_first_layer_only(model, bits, group_size):
    """Only the first MoE layer."""
    return _qcopy(model, bits, group_size, layers=(0,))


@M.wrong("check_quantized_copy", "routers")
def qcopy_router_too(model, bits, group_size):
    """The routers quantized as well."""
    return _qcopy(model, bits, group_size, router=True)


@M.wrong("check_quantized_copy", "fake_quant_clipped")
def qcopy_plain_rtn(model, bits, group_size):
    """The package's plain round-to-nearest instead of the clipping search."""
    from moe_course.compress.quantization import fake_quantize
    from moe_course.layers import moe_layers
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moe_layers(m):
            for name in ("w_in", "w_gate", "w_out"):
                w = getattr(layer.experts, name)
                if w is not None:
                    q = fake_quantize(w.transpose(1, 2).contiguous(), bits, granularity="group", group_size=group_size)
                    w.copy_(q.transpose(1, 2))
    return m


# ------------------------------------------------------------------ 5.4 allocate_bits
def _gains(model, calib, kind="gain"):
    from moe_course.calib import layer_inputs
    from moe_course.compress.quantization import quantize
    from moe_course.layers import moe_layers
    q2, q3 = quantize(model, 2), quantize(model, 3)
    out = []
    with torch.no_grad():
        for layer, l2, l3, x in zip(moe_layers(model), moe_layers(q2), moe_layers(q3),
                                    layer_inputs(model, calib)):
            r = layer.router(x)
            gate = torch.zeros(len(x), layer.num_experts).scatter(1, r.indices, r.weights)
            if kind == "frequency":
                out.append((gate > 0).float().mean(0))
                continue
            y = layer.experts.forward_all(x)
            e2 = ((gate.T[..., None] * (y - l2.experts.forward_all(x))) ** 2).sum((1, 2))
            e3 = ((gate.T[..., None] * (y - l3.experts.forward_all(x))) ** 2).sum((1, 2))
            out.append(e2 - e3)
    return out


def _n_high(model):
    from moe_course import metrics
    from moe_course.compress.quantization import quantize
    b0 = metrics.size_report(model).expert_bytes
    b2 = metrics.size_report(quantize(model, 2)).expert_bytes
    b3 = metrics.size_report(quantize(model, 3)).expert_bytes
    n = sum(layer for layer in [len(s) for s in _shape(model)])
    per = (b3 - b2) / n
    return int((b0 / 12.0 - b2) // per)


def _shape(model):
    from moe_course.layers import moe_layers
    return [range(layer.num_experts) for layer in moe_layers(model)]


def _alloc(scores, n_high, reverse=False):
    flat = sorted(((float(s[e]), i, e) for i, s in enumerate(scores) for e in range(len(s))),
                  reverse=not reverse)
    bits = [[2] * len(s) for s in scores]
    for _, i, e in flat[:n_high]:
        bits[i][e] = 3
    return bits


@M.right("check_allocate_bits")
def alloc_by_gain_counting_bytes(model, calib):
    """The same gain, but the number of 3-bit experts found by quantizing and measuring bytes."""
    from moe_course import metrics
    from moe_course.compress.quantization import quantize
    gains = _gains(model, calib)
    b0 = metrics.size_report(model).expert_bytes
    best = _alloc(gains, 0)
    for n in range(1, 33):
        bits = _alloc(gains, n)
        if b0 / metrics.size_report(quantize(model, bits)).expert_bytes < 12.0:
            break
        best = bits
    return best


@M.wrong("check_allocate_bits", "only", "smaller")
def alloc_uniform_3(model, calib):
    """Every expert at 3 bits."""
    return [[3] * len(r) for r in _shape(model)]


@M.wrong("check_allocate_bits", "every expert at 2 bits")
def alloc_uniform_2(model, calib):
    """Every expert at 2 bits."""
    return [[2] * len(r) for r in _shape(model)]


@M.wrong("check_allocate_bits", "frequen")
def alloc_by_frequency(model, calib):
    """3 bits for the most frequently routed experts."""
    return _alloc(_gains(model, calib, "frequency"), _n_high(model))


@M.wrong("check_allocate_bits", "upside down")
def alloc_reversed(model, calib):
    """3 bits for the experts whose error the extra bit lowers least."""
    return _alloc(_gains(model, calib), _n_high(model), reverse=True)


@M.wrong("check_allocate_bits", "misses the target")
def alloc_random(model, calib):
    """3 bits for experts chosen at random."""
    g = torch.Generator().manual_seed(0)
    return _alloc([torch.rand(len(r), generator=g) for r in _shape(model)], _n_high(model))


@M.wrong("check_allocate_bits", "one list of bits per MoE layer")
def alloc_as_tensor(model, calib):
    """Returns a tensor [L, N] instead of lists."""
    return torch.tensor(_alloc(_gains(model, calib), _n_high(model)))


@M.wrong("check_allocate_bits", "modified its input")
def alloc_quantizes_in_place(model, calib):
    """Quantizes the given model in place to measure the 2-bit error."""
    from moe_course.compress.quantization import fake_quantize
    from moe_course.layers import moe_layers
    bits = _alloc(_gains(model, calib), _n_high(model))
    with torch.no_grad():
        w = moe_layers(model)[0].experts.w_in
        w.copy_(fake_quantize(w, 2))
    return bits
