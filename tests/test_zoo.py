"""The model zoo: train once, cache atomically, load fast, rebuild what is broken, never train twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moe_course import zoo
from moe_course.models import MoEClassifier, MoETransformerLM


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """One trained entry per model, shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("zoo")
    for name in zoo.NAMES:
        zoo.pretrained(name, preset="test", cache_dir=root, progress=False)
    return root


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_COURSE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "moe_course"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert zoo.cache_dir() == Path.home() / ".cache" / "moe_course"
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path / "env"))
    assert zoo.cache_dir() == tmp_path / "env"
    assert zoo.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_first_call_trains_and_writes_then_loads_fast(cache):
    assert not zoo.is_cached("mnist1d-moe", "test")
    first = zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    assert first.zoo_info["source"] == "trained"
    entry = zoo.entry_dir("mnist1d-moe", "test")
    assert entry.parent == cache and entry.name.startswith("mnist1d-moe-test-")
    assert {p.name for p in entry.iterdir()} == {"config.json", "model.safetensors", "metadata.json"}
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]  # temp dir renamed away
    assert zoo.is_cached("mnist1d-moe", "test")

    start = time.perf_counter()
    second = zoo.pretrained("mnist1d-moe", preset="test")
    assert time.perf_counter() - start < 1.0
    assert second.zoo_info["source"] == "cache"
    assert isinstance(second, MoEClassifier) and not second.training
    assert next(second.parameters()).device.type == "cpu"
    assert _states_equal(first, second)
    info = second.zoo_info
    assert info["torch_version"] == torch.__version__ and info["train_seconds"] > 0
    assert set(info["final_eval"]) == {"loss", "accuracy"}


def test_lm_entry_has_tokenizer_and_metadata(warm_cache):
    model = zoo.pretrained("shakespeare-moe", preset="test", cache_dir=warm_cache)
    assert isinstance(model, MoETransformerLM)
    assert model.tokenizer.vocab_size == model.config.vocab_size
    assert model.tokenizer.decode(model.tokenizer.encode("ROMEO:")) == "ROMEO:"
    assert set(model.zoo_info["final_eval"]) == {"loss", "perplexity"}
    text = model.generate_text("ROMEO:", max_new_tokens=20)
    assert text.startswith("ROMEO:") and len(text) == 26


def test_training_is_deterministic(warm_cache, tmp_path):
    again = zoo.pretrained("mnist1d-moe", preset="test", cache_dir=tmp_path, progress=False)
    cached = zoo.pretrained("mnist1d-moe", preset="test", cache_dir=warm_cache)
    assert _states_equal(again, cached)


def test_data_matches_what_the_model_was_evaluated_on(warm_cache):
    from moe_course.train import evaluate

    for name in zoo.NAMES:
        model = zoo.pretrained(name, preset="test", cache_dir=warm_cache)
        splits = zoo.data(name, preset="test")
        assert set(splits) == {"train", "validation"} and len(splits["train"]) > len(splits["validation"]) > 0
        ev = evaluate(model, splits["validation"], batch_size=256)
        for key, value in model.zoo_info["final_eval"].items():
            assert ev[key] == pytest.approx(value, rel=1e-4), (name, key)


def test_corrupt_weights_are_rebuilt_with_a_warning(cache):
    first = zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    weights = zoo.entry_dir("mnist1d-moe", "test") / "model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    assert rebuilt.zoo_info["source"] == "trained" and _states_equal(first, rebuilt)
    assert zoo.pretrained("mnist1d-moe", preset="test").zoo_info["source"] == "cache"


def test_missing_file_and_mismatched_config_are_rebuilt(cache):
    zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    entry = zoo.entry_dir("mnist1d-moe", "test")
    (entry / "metadata.json").unlink()
    assert not zoo.is_cached("mnist1d-moe", "test")
    with pytest.warns(UserWarning, match="metadata.json"):
        zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    cfg_path = entry / "config.json"
    stored = json.loads(cfg_path.read_text())
    stored["spec"]["train_config"]["steps"] = 1
    cfg_path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="config mismatch"):
        model = zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    assert model.zoo_info["source"] == "trained"


def test_config_change_gives_a_new_entry(cache, monkeypatch):
    before = zoo.entry_dir("mnist1d-moe", "test")
    assert before == zoo.entry_dir("mnist1d-moe", "test")  # stable key
    assert before != zoo.entry_dir("shakespeare-moe", "test")
    monkeypatch.setattr(zoo, "ZOO_VERSION", zoo.ZOO_VERSION + 1)
    assert zoo.entry_dir("mnist1d-moe", "test") != before
    monkeypatch.undo()
    original = zoo.preset_configs

    def changed(name="auto", model="shakespeare-moe"):
        cfg, train_cfg = original(name, model)
        return cfg.replace(k=1), train_cfg

    monkeypatch.setattr(zoo, "preset_configs", changed)
    assert zoo.entry_dir("mnist1d-moe", "test") != before


def test_retrain_replaces_the_entry(warm_cache):
    model = zoo.pretrained("mnist1d-moe", preset="test", cache_dir=warm_cache, retrain=True, progress=False)
    assert model.zoo_info["source"] == "trained"
    assert zoo.is_cached("mnist1d-moe", "test", cache_dir=warm_cache)


def test_unknown_names_and_presets(cache):
    with pytest.raises(ValueError, match="shakespeare-moe.*mnist1d-moe"):
        zoo.pretrained("gpt2")
    with pytest.raises(ValueError, match="'cpu', 'gpu', 'test', 'auto'"):
        zoo.pretrained("mnist1d-moe", preset="large")
    with pytest.raises(ValueError, match="mnist1d-moe"):
        zoo.data("mnist")
    with pytest.raises(ValueError, match="mnist1d-moe"):
        zoo.is_cached("mnist")


_CHILD = textwrap.dedent(
    """
    import sys
    from moe_course import zoo
    print("calling", flush=True)
    model = zoo.pretrained("mnist1d-moe", preset="test", progress=False)
    print("source=" + model.zoo_info["source"], model.zoo_info["run_id"], flush=True)
    """
)


def test_concurrent_processes_train_only_once(cache):
    """Two processes ask for the same missing entry while it is locked: exactly one trains."""
    entry = zoo.entry_dir("mnist1d-moe", "test")
    env = {**os.environ, "MOE_COURSE_CACHE": str(cache), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    # Hold the entry's lock so both children are certainly waiting at the same moment.
    with zoo._locked(entry):
        procs = [
            subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for p in procs:
            assert p.stdout.readline().strip() == "calling"
        time.sleep(0.5)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    lines = [out.strip().splitlines()[-1].split() for out, _ in outputs]
    assert sorted(source for source, _ in lines) == ["source=cache", "source=trained"]
    assert lines[0][1] == lines[1][1]  # both got the weights of the same training run


def test_cpu_training_uses_a_fixed_thread_count_and_restores_it(tmp_path, monkeypatch):
    """Float reductions split by thread: the zoo trains every CPU model with TRAIN_THREADS threads, so the
    same model (and the book's numbers) comes out on a 1-core VM and on a 16-core laptop."""
    import torch

    seen = []
    real_fit = zoo.fit

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(zoo, "fit", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = zoo.pretrained("mnist1d-moe", preset="test", cache_dir=tmp_path, progress=False)
        assert torch.get_num_threads() == 1  # the caller's setting is back
    finally:
        torch.set_num_threads(before)
    assert seen == [zoo.TRAIN_THREADS] and model.zoo_info["num_threads"] == zoo.TRAIN_THREADS


def test_digits_entry_loads_as_an_image_classifier(warm_cache):
    from moe_course.models import ImageClassifierConfig, MoEImageClassifier

    model = zoo.pretrained("digits-moe", preset="test", cache_dir=warm_cache)
    assert isinstance(model, MoEImageClassifier) and isinstance(model.config, ImageClassifierConfig)
    assert model.zoo_info["source"] == "cache" and model.zoo_info["eval_split"] == "test"
    assert zoo.entry_dir("digits-moe", "test", cache_dir=warm_cache).name.startswith("digits-moe-test-")
