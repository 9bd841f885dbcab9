"""Mutation suite for the graders: every exercise's checker must reject plausible wrong answers
with a hint that names the mistake, and accept the solution notebook's own code plus at least one
correct alternative written differently.

The wrong answers ("mutants") and the alternatives live in ``tests/mutants/chNN.py``; the
reference is the code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in
``solutions/NN_*.ipynb``, executed as it stands. Every exercise those notebooks check must have at
least :data:`MIN_MUTANTS` mutants and one alternative.
"""

from __future__ import annotations

import ast
import importlib
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from moe_course import metrics
from moe_course.grading import runner
from moe_course.grading.core import FAIL, PASS

import mutants

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
MIN_MUTANTS = 5

WRONG, RIGHT = mutants.load_all()

pytestmark = pytest.mark.usefixtures("single_thread")


def _expected_checks() -> list[str]:
    """``chNN.check_*`` ids of every check cell of every solution notebook, in order."""
    out = []
    for path in SOLUTIONS:
        out += runner.expected_checks(nbformat.read(path, as_version=4))
    return out


def _run_imports(source: str, namespace: dict) -> None:
    """Execute only the import statements of a notebook cell (cells with magics are skipped)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    if imports:
        exec(compile(ast.Module(body=imports, type_ignores=[]), "<imports>", "exec"), namespace)


def _solution_functions() -> dict[str, object]:
    """The solution notebooks' own functions, keyed by the check id of the check cell that follows."""
    found = {}
    for path in SOLUTIONS:
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if c.cell_type == "code"]
        # one namespace per notebook: a "use it" exercise calls the learner's earlier functions
        namespace = {"torch": torch, "nn": nn, "F": F, "np": np, "math": math, "metrics": metrics,
                     "linear_sum_assignment": linear_sum_assignment}
        for i, cell in enumerate(cells):
            if "### BEGIN SOLUTION" not in cell.source:
                _run_imports(cell.source, namespace)  # the notebook's own imports (copy, moe_layers, ...)
                continue
            before = set(namespace)
            exec(compile(cell.source, f"{path.name}[{i}]", "exec"), namespace)
            fns = [v for k, v in namespace.items() if k not in before and callable(v) and not isinstance(v, type)
                   and getattr(v, "__module__", None) in {None, "builtins", namespace.get("__name__")}]
            checks = runner.expected_checks(nbformat.v4.new_notebook(cells=[cells[i + 1]]))
            assert len(fns) == 1 and len(checks) == 1, f"{path.name}: cannot pair solution cell {i} with its check"
            found[checks[0]] = fns[0]
    return found


EXPECTED = _expected_checks()
REFERENCES = _solution_functions()


def _check(check_id: str):
    chapter, name = check_id.split(".")
    return getattr(importlib.import_module(f"moe_course.grading.{chapter}"), name)


def test_every_exercise_has_mutants_and_an_alternative():
    assert EXPECTED, "no check cells found in solutions/"
    assert sorted(REFERENCES) == sorted(EXPECTED), "every check cell follows exactly one solution region"
    counts = {c: sum(e.check_id == c for e in WRONG) for c in EXPECTED}
    thin = {c: n for c, n in counts.items() if n < MIN_MUTANTS}
    assert not thin, f"exercises with fewer than {MIN_MUTANTS} mutants: {thin}"
    lonely = [c for c in EXPECTED if not any(e.check_id == c for e in RIGHT)]
    assert not lonely, f"exercises without a correct alternative: {lonely}"
    unknown = {e.check_id for e in WRONG + RIGHT} - set(EXPECTED)
    assert not unknown, f"mutants registered for checks no solution notebook calls: {unknown}"


@pytest.mark.parametrize("check_id", EXPECTED)
def test_solution_notebook_code_passes(check_id):
    result = _check(check_id)(REFERENCES[check_id], quiet=True)
    assert result.status == PASS, result.message


@pytest.mark.parametrize("entry", RIGHT, ids=lambda e: e.id)
def test_correct_alternative_passes(entry):
    result = _check(entry.check_id)(entry.fn, quiet=True)
    assert result.status == PASS, f"{entry.what}: {result.message}"


@pytest.mark.parametrize("entry", WRONG, ids=lambda e: e.id)
def test_mutant_is_rejected_with_a_hint(entry):
    result = _check(entry.check_id)(entry.fn, quiet=True)
    assert result.status == FAIL, f"{entry.what}: status {result.status!r}: {result.message}"
    message = result.message.lower()
    missing = [w for w in entry.hint if w.lower() not in message]
    assert not missing, f"{entry.what}: the hint should mention {missing}; it reads: {result.message}"
