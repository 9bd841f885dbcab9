"""Quantized CPU inference against fp32 on both zoo models: true bytes, latency, quality.

    python bench/quantization.py            # both zoo models, batch 1 and a full batch
    python bench/quantization.py --quick    # fewer rounds

Variants: fp32; the course's packed ``QuantizedExperts`` (int8 per channel, 4-bit groups of 32,
dequantized on the fly in PyTorch); the deprecated ``torch.ao.quantization.quantize_dynamic``
(int8 fbgemm kernels, but it only swaps ``nn.Linear``: stacked experts stay fp32); and, when
torchao is installed (optional: ``pip install torchao==0.18.0``), torchao's ``Int8WeightOnlyConfig``
applied the same way (also ``nn.Linear`` only). All variants run interleaved (round-robin) in one
process so that machine noise hits them alike; we report medians. Bytes are those of
``moe_course.metrics.size_report`` (tensor storage; the packed params of ``quantize_dynamic`` are not
tensors it can see, so its row shows the fp32 experts that remain).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import warnings

import torch
import torch.nn as nn

from moe_course import calib, metrics, zoo
from moe_course.compress.quantization import quantize
from moe_course.train import evaluate


def _non_router_linears(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` modules outside the routers (a quantized router gate has no
    ``.weight`` tensor, and the router must stay fp32 anyway)."""
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".router" not in f".{n}"}


def variants(model: nn.Module) -> dict[str, nn.Module]:
    linears = _non_router_linears(model)
    out = {"fp32": model, "packed int8/channel": quantize(model, 8), "packed 4-bit g32": quantize(model, 4, group_size=32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torch.ao dynamic int8 (deprecated)"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), linears, dtype=torch.qint8)
    if importlib.util.find_spec("torchao") is not None:
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # its CUDA .so files are irrelevant on CPU
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torchao.quantization import Int8WeightOnlyConfig, quantize_

            m = copy.deepcopy(model)
            quantize_(m, Int8WeightOnlyConfig(), filter_fn=lambda mod, fqn: fqn in linears)
            out["torchao int8 weight-only"] = m
        except Exception as err:  # an optional backend must not break the benchmark
            print(f"torchao present but failed: {type(err).__name__}: {err}")
    return out


def time_round_robin(models: dict[str, nn.Module], batch, rounds: int) -> dict[str, float]:
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            calib.forward(m, batch)  # warm-up
        for _ in range(rounds):
            for name, m in models.items():
                times[name].append(metrics.timed_ms(lambda: calib.forward(m, batch)))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 5 if args.quick else 20
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"torchao {'installed' if importlib.util.find_spec('torchao') else 'not installed'}")
    for name in ("shakespeare-moe", "mnist1d-moe"):
        model = zoo.pretrained(name, progress=False).cpu().eval()
        val = zoo.data(name)["validation"]
        models = variants(model)
        key = "input_ids" if name == "shakespeare-moe" else "x"
        lat = {bs: time_round_robin(models, {key: val[:bs][key]}, rounds) for bs in (1, 64)}
        print(f"\n{name} (median ms over {rounds} interleaved rounds; quality on the zoo's validation split)")
        print(f"{'variant':<36} {'bytes':>10} {'expert bytes':>13} {'quality':>9} {'bs=1 ms':>9} {'bs=64 ms':>9}")
        for vname, m in models.items():
            r = metrics.size_report(m)
            q = evaluate(m, val, batch_size=128)
            quality = q.get("perplexity", q.get("accuracy"))
            print(f"{vname:<36} {r.bytes:>10,} {r.expert_bytes:>13,} {quality:>9.4f} "
                  f"{lat[1][vname]:>9.2f} {lat[64][vname]:>9.2f}")


if __name__ == "__main__":
    main()
