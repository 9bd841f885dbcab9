"""What every checker of every chapter must do, written once: an exercise as handed out (its body
raises ``NotImplementedError``) reads "not implemented", without raising and without printing a
traceback. Each chapter's own file (``test_grading_chNN.py``) tests that its references pass and
its typical mistakes are caught; ``test_grader_mutations.py`` runs the plausible wrong answers."""

from __future__ import annotations

import importlib

import pytest
from conftest import run, stub

from moe_course.grading.core import NOT_IMPLEMENTED

CHECKS = [(f"ch{n:02d}", name) for n in range(1, 12)
          for name in importlib.import_module(f"moe_course.grading.ch{n:02d}").__all__ if name.startswith("check_")]


@pytest.mark.parametrize("chapter, name", CHECKS, ids=[f"{c}.{n}" for c, n in CHECKS])
def test_a_stub_reads_not_implemented(chapter, name, capsys):
    check = getattr(importlib.import_module(f"moe_course.grading.{chapter}"), name)
    assert run(check, stub).status == NOT_IMPLEMENTED      # quietly
    result = check(stub)                                   # and as a check cell shows it
    out = capsys.readouterr().out
    assert result.status == NOT_IMPLEMENTED and "not implemented" in out and "Traceback" not in out


def test_every_chapter_with_exercises_has_checks():
    assert {c for c, _ in CHECKS} == {f"ch{n:02d}" for n in range(1, 12)}
