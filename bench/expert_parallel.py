"""All-to-all traffic of expert parallelism for compressed variants of the course's language model.

    python bench/expert_parallel.py [--ranks 4] [--quick]

Each variant's first MoE layer is sharded over ``--ranks`` gloo processes on this machine
(:class:`moe_course.serving.parallel.ExpertParallelMoE`); every rank feeds its share of real
hidden states (the layer's inputs on held-out plays) and the ranks report the bytes they sent to
*other* ranks (rows out + results back), per token, and the step time. Variants: fp32 rows,
bf16 rows (a quantized payload), a capacity factor of 1.0, experts merged 8 -> 4, experts dropped
8 -> 6. On one machine the "network" is shared memory, so the times show the software overhead,
not a real interconnect; the bytes are what a real one would carry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init: str, variants: dict, hidden: torch.Tensor, out: str, rounds: int) -> None:
    from moe_course.serving.parallel import ExpertParallelMoE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    results = {}
    for name, (moe, dtype) in variants.items():
        x = hidden.chunk(world)[rank]
        ep = ExpertParallelMoE.from_sparse(moe, payload_dtype=dtype)
        times = []
        with torch.inference_mode():
            for _ in range(rounds):
                dist.barrier()
                t0 = time.perf_counter()
                ep(x)
                times.append((time.perf_counter() - t0) * 1e3)
        results[name] = {"bytes": ep.last_comm["bytes_sent"], "tokens": x.shape[0], "ms": statistics.median(times)}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from moe_course import zoo
    from moe_course.compress.merging import merge_experts
    from moe_course.compress.trimming import drop_experts
    from moe_course.layers import moe_layers

    model = zoo.pretrained("shakespeare-moe", preset="cpu", progress=False).eval()
    data = zoo.data("shakespeare-moe", preset="cpu")
    calib = data["train"].shuffle(seed=0).select(range(32))
    ids = torch.stack([torch.as_tensor(r) for r in data["validation"].select(range(8 if args.quick else 32))["input_ids"]])
    captured = {}
    layer0 = moe_layers(model)[0]

    def grab(module, inputs, output) -> None:  # a hook that returns something would replace the output
        captured["x"] = inputs[0].reshape(-1, inputs[0].shape[-1])

    handle = layer0.register_forward_hook(grab)
    with torch.inference_mode():
        model(ids[:, :-1])
    handle.remove()
    capped = copy_with_capacity(layer0, 1.0)
    variants = {
        "fp32 rows": (layer0, None),
        "bf16 rows": (layer0, torch.bfloat16),
        "capacity factor 1.0": (capped, None),
        "merged 8->4": (moe_layers(merge_experts(model, 4, calib=calib))[0], None),
        "dropped 8->6": (moe_layers(drop_experts(model, 6, calib=calib))[0], None),
    }
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args.ranks, os.path.join(tmp, "init"), variants, captured["x"].clone(), tmp,
                              3 if args.quick else 10),
                 nprocs=args.ranks, join=True)
        per_rank = [json.load(open(os.path.join(tmp, f"{r}.json"))) for r in range(args.ranks)]
    print(f"{args.ranks} ranks, {captured['x'].shape[0]} tokens of layer-0 inputs (d_model {captured['x'].shape[1]})")
    print(f"{'variant':<22}{'bytes/token':>12}{'vs fp32':>9}{'step ms (slowest rank)':>25}")
    base = None
    for name in variants:
        sent = sum(r[name]["bytes"] for r in per_rank) / sum(r[name]["tokens"] for r in per_rank)
        base = base or sent
        ms = max(r[name]["ms"] for r in per_rank)
        print(f"{name:<22}{sent:>12.0f}{sent / base:>9.2f}{ms:>25.2f}")


def copy_with_capacity(layer, cf: float):
    import copy

    new = copy.deepcopy(layer)
    new.capacity_factor = cf
    return new


if __name__ == "__main__":
    main()
