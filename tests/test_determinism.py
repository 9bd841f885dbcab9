"""Determinism: the zoo's models and the chapters' figures are identical across runs.

Two fresh Python processes, each with its own empty cache directory, train every zoo model at the
``test`` preset (same seed, CPU, one thread) and render a chapter figure from the trained model
(routing statistics -> expert-utilization bars) and from seeded data (routing heatmap, loss
curves). The state dicts (sha256 of every tensor's bytes), the safetensors files, the evaluation
numbers, the plotted data and the PNG bytes must all be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moe_course import zoo

_RUN = textwrap.dedent(
    """
    import hashlib, io, json, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import matplotlib
    matplotlib.use("Agg")
    from moe_course import metrics, viz, zoo

    def tensor_sha(state):
        h = hashlib.sha256()
        for key, t in sorted(state.items()):
            h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def png(fig):
        buf = io.BytesIO()
        # no Software/date chunks: the bytes depend only on what is drawn
        fig.savefig(buf, format="png", metadata={"Software": None})
        matplotlib.pyplot.close(fig)
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def plotted(fig):
        # the data behind the marks: bar heights, line data and image arrays of every axes
        out = []
        for ax in fig.axes:
            out += [round(float(p.get_height()), 12) for p in ax.patches if hasattr(p, "get_height")]
            out += [np.asarray(l.get_xydata(), dtype=float).round(12).tolist() for l in ax.get_lines()]
            out += [np.asarray(im.get_array(), dtype=float).round(12).tolist() for im in ax.get_images()]
        return hashlib.sha256(json.dumps(out).encode()).hexdigest()

    result = {}
    for name in zoo.NAMES:
        model = zoo.pretrained(name, preset="test", cache_dir=sys.argv[1], progress=False)
        entry = zoo.entry_dir(name, "test", cache_dir=sys.argv[1])
        stats = metrics.routing_stats(model, zoo.data(name, "test")["validation"], max_batches=2)
        fig = viz.plot_expert_utilization(stats)
        result[name] = {
            "state_sha": tensor_sha(model.state_dict()),
            "file_sha": hashlib.sha256((entry / "model.safetensors").read_bytes()).hexdigest(),
            "final_eval": model.zoo_info["final_eval"],
            "history": {k: v for k, v in model.zoo_info["history"].items() if "time" not in k and "second" not in k},
            "run_id": model.zoo_info["run_id"],
            "frequency": [s.frequency.tolist() for s in stats.layers],
            "figure_data": plotted(fig),
            "figure_png": png(fig),
        }
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(24, 6, generator=g) * 2, -1)
    heat = viz.plot_routing_heatmap(list("To be, or not to be, tha"), probs)
    history = {"steps": list(range(0, 200, 10)),
               "train_loss": (2.5 * torch.exp(-torch.arange(20) / 8.0) + 0.05 * torch.rand(20, generator=g)).tolist(),
               "eval_steps": [0, 100, 190], "eval_metrics": [{"loss": 2.4, "accuracy": 0.2},
                                                             {"loss": 1.1, "accuracy": 0.6},
                                                             {"loss": 0.6, "accuracy": 0.8}]}
    curves = viz.plot_loss_curves(history)
    result["seeded figures"] = {"heatmap_data": plotted(heat), "heatmap_png": png(heat),
                                "curves_data": plotted(curves), "curves_png": png(curves)}
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    """
)


def _run_twice(tmp_path: Path) -> list[dict]:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "MPLBACKEND": "Agg"}
    env.pop(zoo.ENV_VAR, None)
    procs = [subprocess.Popen([sys.executable, "-c", _RUN, str(tmp_path / f"cache{i}")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outputs]
    return [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
            for out, _ in outputs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    return _run_twice(tmp_path_factory.mktemp("determinism"))


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_is_identical_across_two_trainings(runs, name):
    a, b = runs[0][name], runs[1][name]
    assert a["run_id"] != b["run_id"]  # two real trainings, not one cache entry read twice
    assert a["state_sha"] == b["state_sha"]
    assert a["file_sha"] == b["file_sha"]
    assert a["final_eval"] == b["final_eval"] and a["history"] == b["history"]  # timings left out
    assert a["history"]["final_train_loss"] != a["history"]["first_train_loss"]  # it did train


@pytest.mark.parametrize("name", zoo.NAMES)
def test_chapter_figure_from_the_trained_model_is_identical(runs, name):
    a, b = runs[0][name], runs[1][name]
    assert a["frequency"] == b["frequency"]
    assert a["figure_data"] == b["figure_data"]
    assert a["figure_png"] == b["figure_png"]


def test_figures_from_seeded_data_are_identical(runs):
    a, b = runs[0]["seeded figures"], runs[1]["seeded figures"]
    assert set(a) == {"heatmap_data", "heatmap_png", "curves_data", "curves_png"}
    assert a == b
