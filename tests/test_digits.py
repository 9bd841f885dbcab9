"""The image case study: the real 8x8 handwritten digits (UCI optdigits, shipped with
scikit-learn), the convolutional MoE classifier and the ``digits-moe`` zoo entry.

The loader must split deterministically, stratified and without leakage; the model must route
every position token through its MoE layers; the ``test`` preset must learn; and every compression
transform of :mod:`moe_course.compress` must run on the model as it does on ``mnist1d-moe``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_course import data, zoo
from moe_course.models import ImageClassifierConfig, MoEImageClassifier, model_from_config

pytestmark = pytest.mark.usefixtures("single_thread")

sklearn_datasets = pytest.importorskip("sklearn.datasets")

# The test preset (60 steps) measured 0.66 test accuracy; chance is 0.10.
TEST_PRESET_ACCURACY_FLOOR = 0.45


# ------------------------------------------------------------------------------------- loader
def test_split_sizes_shapes_and_dtypes():
    ds = data.load_digits()
    assert list(ds) == ["train", "validation", "test"]
    sizes = {k: len(v) for k, v in ds.items()}
    assert sizes == {"train": 1259, "validation": 179, "test": 359}
    assert sum(sizes.values()) == data.DIGITS_SIZE == 1797
    row = ds["train"][:4]
    assert row["x"].shape == (4, 1, 8, 8) and row["x"].dtype == torch.float32
    assert row["y"].dtype == torch.int64
    x = ds["train"][:]["x"]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # counts 0..16 scaled by 1/16


def test_split_is_stratified():
    ds = data.load_digits()
    for split, rows in ds.items():
        counts = np.bincount(rows[:]["y"].numpy(), minlength=10)
        share = counts / counts.sum()
        assert np.all(np.abs(share - 0.1) < 0.012), (split, counts)


def test_split_is_deterministic_per_seed_and_leaves_global_rngs_alone():
    np.random.seed(123)
    torch.manual_seed(123)
    before = (np.random.rand(), torch.rand(1))
    np.random.seed(123)
    torch.manual_seed(123)
    a = data.digits_split_indices(seed=0)
    after = (np.random.rand(), torch.rand(1))
    assert before[0] == after[0] and torch.equal(before[1], after[1])
    b = data.digits_split_indices(seed=0)
    c = data.digits_split_indices(seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    x1, x2 = data.load_digits(seed=0)["test"][:]["x"], data.load_digits(seed=0)["test"][:]["x"]
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("seed", [0, 7])
def test_no_leakage_and_rows_match_the_source(seed):
    idx = data.digits_split_indices(seed=seed)
    rows = np.concatenate(list(idx.values()))
    assert len(rows) == len(set(rows.tolist())) == 1797  # disjoint and complete
    raw = sklearn_datasets.load_digits()
    ds = data.load_digits(seed=seed)
    for split, where in idx.items():
        got = ds[split][:]
        np.testing.assert_array_equal(got["y"].numpy(), raw.target[where])
        np.testing.assert_allclose(got["x"].numpy()[:, 0], raw.images[where] / 16.0, atol=1e-7)
    # and no image appears in two splits, not even as a duplicate row of the source
    keys = {s: {ds[s][i]["x"].numpy().tobytes() for i in range(len(ds[s]))} for s in ds}
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])


def test_zero_validation_fraction_and_bad_arguments():
    ds = data.load_digits(val_fraction=0.0)
    assert list(ds) == ["train", "test"] and len(ds["train"]) == 1438
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        data.load_digits(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=0.0)
    with pytest.raises(TypeError, match="seed"):
        data.load_digits(seed=1.5)


# -------------------------------------------------------------------------------------- model
def small_model(**kw) -> MoEImageClassifier:
    torch.manual_seed(0)
    cfg = ImageClassifierConfig(d_model=32, n_layers=2, n_heads=4, num_experts=4, k=2, d_hidden=32, **kw)
    return model_from_config(cfg)


@pytest.mark.parametrize("mixer", ["conv", "attention", "none"])
def test_forward_shapes_and_loss(mixer):
    model = small_model(mixer=mixer)
    x = torch.rand(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    assert torch.equal(model(x), model(x[:, 0]))  # [B, 8, 8] is one channel
    assert model.features(x).shape == (5, 16, 32)
    loss, metrics = model.compute_loss({"x": x, "y": torch.arange(5)})
    assert loss.ndim == 0 and {"ce", "accuracy", "balance", "z"} <= set(metrics)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_every_position_token_is_routed():
    model = small_model()
    assert model.config.num_tokens == 16 and len(model.moe_layers()) == 2
    seen = []
    hook = model.moe_layers()[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model(torch.rand(3, 1, 8, 8))
    hook.remove()
    assert seen[0][:-1] in ((3, 16), (48,))


def test_input_and_config_validation():
    model = small_model()
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.rand(2, 1, 7, 7))
    with pytest.raises(ValueError, match="stride"):
        ImageClassifierConfig(stride=9)
    with pytest.raises(ValueError, match="mixer"):
        ImageClassifierConfig(mixer="mlp")
    with pytest.raises(TypeError, match="ImageClassifierConfig"):
        MoEImageClassifier(object())
    cfg = ImageClassifierConfig(d_model=16, n_heads=2)
    assert ImageClassifierConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------- zoo
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return zoo.pretrained("digits-moe", preset="test", cache_dir=tmp_path_factory.mktemp("zoo"), progress=False)


def test_zoo_test_preset_learns(trained):
    from moe_course.train import evaluate

    assert isinstance(trained, MoEImageClassifier) and not trained.training
    split = zoo.data("digits-moe", "test")
    assert len(split["train"]) == 1438 and len(split["validation"]) == 359
    acc = trained.zoo_info["final_eval"]["accuracy"]
    assert acc >= TEST_PRESET_ACCURACY_FLOOR
    assert evaluate(trained, split["validation"], batch_size=256)["accuracy"] == pytest.approx(acc, rel=1e-6)


def test_zoo_presets():
    for preset in ("test", "cpu", "gpu"):
        cfg, train_cfg = zoo.preset_configs(preset, "digits-moe")
        assert isinstance(cfg, ImageClassifierConfig) and cfg.ffn == "moe" and cfg.k < cfg.num_experts


def _calib():
    return zoo.data("digits-moe", "test")["train"].select(range(128))


TRANSFORMS = [
    ("pruning", "prune_experts", {"keep": 3, "calib": True}),
    ("pruning", "prune_magnitude", {"keep": 0.5}),
    ("pruning", "skip_experts", {"calib": True}),
    ("trimming", "drop_experts", {"keep": 3, "calib": True}),
    ("trimming", "drop_layers", {"keep": 1, "calib": True}),
    ("trimming", "drop_blocks", {"keep": 1, "calib": True}),
    ("merging", "merge_experts", {"keep": 2, "calib": True}),
    ("merging", "hc_smoe", {"keep": 2, "calib": True}),
    ("merging", "mc_smoe", {"keep": 2, "calib": True, "rank": 4, "keep_sparse": 0.2}),
    ("lowrank", "lowrank_experts", {"keep": 4}),
    ("lowrank", "share_experts", {"keep": 4}),
    ("quantization", "quantize", {"bits": 4, "group_size": 16}),
    ("quantization", "quantize_rest", {"bits": 8, "group_size": 16}),
]


@pytest.mark.parametrize("module, name, kwargs", TRANSFORMS, ids=[f"{m}.{n}" for m, n, _ in TRANSFORMS])
def test_every_compression_transform_runs_on_the_image_model(module, name, kwargs):
    import importlib

    fn = getattr(importlib.import_module(f"moe_course.compress.{module}"), name)
    model = small_model().eval()
    kwargs = dict(kwargs)
    if kwargs.pop("calib", False):
        kwargs["calib"] = _calib()
    x = torch.rand(4, 1, 8, 8)
    before = model(x)
    out = fn(model, **kwargs)
    assert out is not model and torch.equal(model(x), before)  # the input is left alone
    logits = out(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_prune_and_quantize_the_trained_model(trained):
    from moe_course.compress.pruning import prune_experts
    from moe_course.compress.quantization import quantize
    from moe_course.metrics import size_report
    from moe_course.train import evaluate

    val = zoo.data("digits-moe", "test")["validation"]
    base = evaluate(trained, val, batch_size=256)["accuracy"]
    pruned = prune_experts(trained, 3, calib=_calib())
    assert [layer.num_experts for layer in pruned.moe_layers()] == [3]
    q4 = quantize(trained, 4)
    assert size_report(q4).expert_bytes < size_report(trained).expert_bytes / 4
    assert evaluate(q4, val, batch_size=256)["accuracy"] >= base - 0.1


def test_course_table_lists_the_digits_model():
    from moe_course import cli, course_table

    assert "digits-moe" in course_table.TABLE_MODELS and course_table.TABLE_MODELS == cli.TABLE_MODELS
    assert "digits-moe" in zoo.NAMES and "digits-moe" in cli.DEFAULT_ZOO_MODELS
    model = small_model()
    names = [t for t, _ in course_table.table_recipes(model, quick=True)]
    assert names[0] == "baseline (fp32)" and "quantize experts" in names
