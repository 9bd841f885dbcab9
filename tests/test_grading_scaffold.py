"""What every checker of every chapter must do, written once: an exercise as handed out (its body
raises ``NotImplementedError``) reads "not implemented", without raising and without printing a
traceback. Each chapter's own file (``test_grading_chNN.py``) tests that its references pass and
its typical mistakes are caught; ``test_grader_mutations.py`` runs the plausible wrong answers."""

from __future__ import annotations

import importlib

from pathlib import Path

import pytest
from conftest import run, stub

from moe_course.grading.core import NOT_IMPLEMENTED

REPO = Path(__file__).resolve().parents[1]
GRADED = sorted(p.stem for p in (REPO / "moe_course" / "grading").glob("ch[0-9][0-9].py"))
CHECKS = [(c, name) for c in GRADED
          for name in importlib.import_module(f"moe_course.grading.{c}").__all__ if name.startswith("check_")]


@pytest.mark.parametrize("chapter, name", CHECKS, ids=[f"{c}.{n}" for c, n in CHECKS])
def test_a_stub_reads_not_implemented(chapter, name, capsys):
    check = getattr(importlib.import_module(f"moe_course.grading.{chapter}"), name)
    assert run(check, stub).status == NOT_IMPLEMENTED      # quietly
    result = check(stub)                                   # and as a check cell shows it
    out = capsys.readouterr().out
    assert result.status == NOT_IMPLEMENTED and "not implemented" in out and "Traceback" not in out


def test_every_chapter_with_exercises_has_checks():
    chapters = {f"ch{p.name[:2]}" for p in (REPO / "solutions").glob("[0-9][0-9]_*.ipynb")}
    assert {c for c, _ in CHECKS} == chapters and len(chapters) >= 11
