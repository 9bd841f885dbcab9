"""Feed-forward kinds registered by other modules plug into both model families via the config."""

import pytest
import torch
from torch import nn

from moe_course.models import ClassifierConfig, LMConfig, MoEClassifier, make_ffn, register_ffn


class Doubler(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return self.scale * x


def test_registered_kind_is_built_from_config_with_its_options():
    register_ffn("test-doubler", lambda cfg: Doubler(cfg.ffn_options["scale"]))
    cfg = ClassifierConfig(d_model=16, n_layers=1, n_heads=2, ffn="test-doubler", ffn_options={"scale": 2.0})
    model = MoEClassifier(cfg)
    assert all(isinstance(b.ffn, Doubler) and b.ffn.scale == 2.0 for b in model.blocks)
    assert model(torch.randn(3, 40)).shape == (3, 10)
    assert LMConfig.from_dict(LMConfig(ffn="test-doubler", ffn_options={"scale": 3.0}).to_dict()).ffn_options == {"scale": 3.0}
    assert isinstance(make_ffn(cfg), Doubler)


def test_builtin_configs_serialise_without_ffn_options():
    assert "ffn_options" not in LMConfig().to_dict()


@pytest.mark.parametrize("name", ["", "moe", 3])
def test_register_rejects_bad_names(name):
    with pytest.raises(ValueError, match="name"):
        register_ffn(name, lambda cfg: nn.Identity())


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="ffn must be one of"):
        LMConfig(ffn="no-such-ffn")
