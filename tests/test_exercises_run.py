"""The student notebooks as handed out: every exercise notebook runs top to bottom with its stubs
in a fresh kernel, and each of its check cells reports "not implemented" (never a crash, never a
pass). This is the learner's first contact with a chapter, so it runs in CI like the solutions do.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from moe_course.grading import runner
from moe_course.grading.core import NOT_IMPLEMENTED

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def report():
    # The whole folder, graded as one "student" against the solutions (the instructor's workflow).
    return runner.grade([ROOT / "exercises"], reference_dir=ROOT / "solutions", cell_timeout=300)


def test_there_is_an_exercise_notebook_per_solution():
    assert [p.name for p in EXERCISES] == sorted(p.name for p in (ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))


def test_every_exercise_notebook_runs_to_the_end(report):
    assert len(report.runs) == len(EXERCISES)
    broken = {r.notebook: (r.outcome, r.detail, r.cell_errors) for r in report.runs
              if r.outcome != "ok" or r.cell_errors}
    assert not broken, f"exercise notebooks that did not run top to bottom with their stubs: {broken}"


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_every_check_reports_not_implemented(report, path):
    expected = runner.expected_checks(nbformat.read(ROOT / "solutions" / path.name, as_version=4))
    rows = [r for r in report.rows if r.notebook == path.stem]
    assert expected, f"solutions/{path.name} has no check cells"
    assert [r.exercise for r in rows] == expected
    wrong = {r.exercise: (r.status, r.message) for r in rows if r.status != NOT_IMPLEMENTED}
    assert not wrong, f"{path.name}: stubs should read 'not implemented', got {wrong}"
