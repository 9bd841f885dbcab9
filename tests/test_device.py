import random

import numpy as np
import pytest
import torch

from moe_course.device import ENV_VAR, default_preset, get_device, seed_everything


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_auto_picks_best_available():
    expected = "cuda" if torch.cuda.is_available() else None
    dev = get_device()
    assert isinstance(dev, torch.device)
    if expected:
        assert dev.type == "cuda"
    else:
        assert dev.type in {"mps", "cpu"}
    assert get_device("auto") == dev


def test_prefer_cpu_and_torch_device():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    assert get_device(" CPU ") == torch.device("cpu")


def test_env_overrides_prefer(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert get_device() == torch.device("cpu")
    # the environment wins even over an explicit argument
    assert get_device("auto") == torch.device("cpu")


def test_bad_prefer_names_argument():
    with pytest.raises(ValueError, match="prefer"):
        get_device("tpu")
    with pytest.raises(TypeError, match="prefer"):
        get_device(3)


def test_bad_env_names_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=ENV_VAR):
        get_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        get_device("cuda")


def test_seed_everything_reproducible():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


@pytest.mark.parametrize(
    "bad, exc", [(-1, ValueError), (2**32, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)]
)
def test_seed_everything_validates(bad, exc):
    with pytest.raises(exc, match="seed"):
        seed_everything(bad)


def test_default_preset():
    assert default_preset("cpu") == "cpu"
    assert default_preset(torch.device("cuda", 0)) == "gpu"
    assert default_preset("cuda:1") == "gpu"
    assert default_preset("mps") == "cpu"
    assert default_preset() == ("gpu" if get_device().type == "cuda" else "cpu")
    with pytest.raises(ValueError, match="device"):
        default_preset("not a device")
    with pytest.raises(TypeError, match="device"):
        default_preset(0)


def test_default_preset_follows_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert default_preset() == "cpu"


def test_preset_env_var_overrides_auto(monkeypatch):
    from moe_course.device import default_preset

    monkeypatch.setenv("MOE_COURSE_PRESET", "cpu")
    assert default_preset("cuda") == "cpu"
    monkeypatch.setenv("MOE_COURSE_PRESET", "gpu")
    assert default_preset("cpu") == "gpu"
    monkeypatch.setenv("MOE_COURSE_PRESET", "huge")
    with pytest.raises(ValueError, match="MOE_COURSE_PRESET must be one of cpu, gpu, test, got 'huge'"):
        default_preset("cpu")
