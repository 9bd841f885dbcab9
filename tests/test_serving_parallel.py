"""Expert parallelism: each rank's output and every gradient equal SparseMoE on the same weights.

The ranks are real processes (``torch.multiprocessing.spawn``) talking through gloo, as they would
through NCCL on GPUs; each sends its tokens to the experts' owners with uneven all-to-alls.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_course.layers import SparseMoE
from moe_course.serving.parallel import ExpertParallelMoE, alltoall_bytes, shard_bounds

D, F_HIDDEN, N_EXPERTS = 16, 24, 6


def _worker(rank: int, world: int, init_file: str, out_dir: str, case: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical layer on every rank
        moe = SparseMoE(D, N_EXPERTS, F_HIDDEN, k=2, capacity_factor=case["cf"], num_shared_experts=case["shared"],
                        activation="swiglu", dispatch=case["strategy"])
        torch.manual_seed(100 + rank)  # each rank has its own tokens, and a different number of them
        tokens = [5, 1, 9, 3][rank]
        x = torch.randn(tokens, D)
        g = torch.randn(tokens, D)
        ep = ExpertParallelMoE.from_sparse(moe)
        ref = copy.deepcopy(moe)
        x_ep, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ep, y_ref = ep(x_ep), ref(x_ref)
        (y_ep * g).sum().backward()
        (y_ref * g).sum().backward()
        start, stop = shard_bounds(N_EXPERTS, world)[rank]
        errors = {"output": (y_ep - y_ref).abs().max().item(), "input grad": (x_ep.grad - x_ref.grad).abs().max().item(),
                  "router grad": (ep.router.gate.weight.grad - ref.router.gate.weight.grad).abs().max().item()}
        for name in ("w_in", "w_gate", "w_out"):  # an expert learns from every rank's tokens
            total = getattr(ref.experts, name).grad.clone()
            dist.all_reduce(total)
            errors[f"{name} grad"] = (getattr(ep.experts, name).grad - total[start:stop]).abs().max().item()
        if ep.shared is not None:
            errors["shared grad"] = (ep.shared.w_in.grad - ref.shared.w_in.grad).abs().max().item()
        with torch.no_grad():
            half = ExpertParallelMoE.from_sparse(moe, payload_dtype=torch.bfloat16)
            errors["bf16 payload output"] = (half(x) - y_ref).abs().max().item()
        with torch.no_grad():
            indices = ref.router(x).indices.tolist()
        result = {"indices": indices, "errors": errors, "comm": ep.last_comm, "comm_bf16": half.last_comm,
                  "shard": [start, stop], "experts_here": ep.experts.num_experts}
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, case", [
    (2, {"cf": None, "shared": 0, "strategy": "loop"}),
    (4, {"cf": 1.0, "shared": 1, "strategy": "grouped"}),  # 6 experts over 4 ranks: shards of 2, 2, 1, 1
], ids=["2 ranks", "4 ranks, capacity, shared expert"])
def test_expert_parallel_equals_sparse_moe(tmp_path, world, case):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), case), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]
    assert [r["shard"] for r in results] == [list(b) for b in shard_bounds(N_EXPERTS, world)]
    for rank, r in enumerate(results):
        for what, err in r["errors"].items():
            limit = 2e-2 if "bf16" in what else 1e-5
            assert err <= limit, f"rank {rank}: {what} differs by {err:.2e}"
        # rows really travel, and a bf16 payload halves the row bytes (ids stay 8 bytes each)
        comm, comm16 = r["comm"], r["comm_bf16"]
        assert comm["rows_sent"] == comm16["rows_sent"]
        rows_out, rows_back = comm["rows_sent"], comm["rows_received"]
        assert comm["bytes_sent"] == rows_out * (4 * D + 8) + rows_back * 4 * D
        assert comm16["bytes_sent"] == rows_out * (2 * D + 8) + rows_back * 2 * D
    assert sum(r["comm"]["rows_sent"] for r in results) == sum(r["comm"]["rows_received"] for r in results) > 0
    # alltoall_bytes predicts the same traffic from the routing decisions alone, without processes
    indices = torch.tensor([i for r in results for i in r["indices"]])
    split = [len(r["indices"]) for r in results]
    pred = alltoall_bytes(indices, N_EXPERTS, world, D, capacity_factor=case["cf"], split=split)
    sent = sum(r["comm"]["bytes_sent"] for r in results)
    assert abs(pred["bytes_per_token"] * sum(split) - sent) < 1e-6


def test_shard_bounds_and_clear_errors():
    assert shard_bounds(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert shard_bounds(8, 1) == [(0, 8)]
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds(2, 4)
    moe = SparseMoE(D, N_EXPERTS, F_HIDDEN)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE.from_sparse(moe)
    with pytest.raises(TypeError, match="SparseMoE"):
        ExpertParallelMoE.from_sparse(torch.nn.Linear(2, 2))
