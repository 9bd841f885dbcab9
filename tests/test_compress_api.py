"""One compression API: ``f(model, <size target>, *, calib=None, inplace=False, **options) -> model``.

Every transform in the table of :mod:`moe_course.compress`'s docstring is checked against its
signature: the model and the size target are the only positional parameters, the target is named
as the table says (``keep`` or ``bits``), ``calib`` and ``inplace`` are keyword-only with their
defaults, and every option is keyword-only.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

import moe_course.compress as compress

ROWS = re.findall(r"^``(\w+)\.(\w+)``(?: \(``calib``\))?\s+(``\w+``|\(none\))", compress.__doc__, re.M)
TARGETS = ("keep", "bits")


def test_the_table_lists_every_transform():
    names = {f"{m}.{f}" for m, f, _ in ROWS}
    assert len(ROWS) == 17 and "quantization.quantize_rest" in names and "trimming.drop_blocks" in names


@pytest.mark.parametrize("module, name, target", ROWS, ids=[f"{m}.{f}" for m, f, _ in ROWS])
def test_transform_follows_the_convention(module, name, target):
    fn = getattr(importlib.import_module(f"moe_course.compress.{module}"), name)
    params = list(inspect.signature(fn).parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    target = target.strip("`")
    assert positional == (["model"] if target == "(none)" else ["model", target]), positional
    assert target == "(none)" or target in TARGETS
    rest = [p for p in params if p.name not in positional]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in rest), [p.name for p in rest]
    by_name = {p.name: p for p in rest}
    assert by_name["inplace"].default is False
    if "calib" in by_name:
        assert by_name["calib"].default is None


def test_distillation_is_training_not_a_transform():
    from moe_course.compress import distillation

    assert not hasattr(distillation, "distill")
    sig = inspect.signature(distillation.train_student)
    assert list(sig.parameters)[:3] == ["student", "teacher", "data"]
    assert "trains" in compress.__doc__ and "TRAIN" in distillation.train_student.__doc__
