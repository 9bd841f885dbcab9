"""The exercise generator: solutions/ -> exercises/ (moe_course.exercises)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from moe_course.exercises import (
    BEGIN_SOLUTION,
    END_SOLUTION,
    MarkerError,
    generate,
    make_exercise,
    solution_regions,
)

REPO = Path(__file__).resolve().parents[1]

ROUTER_SOLUTION = '''import math

def topk_route(scores, k):
    """Return the k largest scores."""
    if k < 1:
        raise ValueError("k must be >= 1")
    for _ in range(1):
        ### BEGIN SOLUTION
        best = sorted(scores, reverse=True)[:k]
        ### END SOLUTION
    return best

class Gate:
    def temperature(self):
        ### BEGIN SOLUTION
        return math.sqrt(4.0)
        ### END SOLUTION
'''


def _solution_notebook() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells = [
        new_markdown_cell("# Chapter 2"),
        new_code_cell(
            ROUTER_SOLUTION,
            execution_count=1,
            outputs=[new_output("stream", name="stdout", text="secret output\n")],
            metadata={"execution": {"iopub.execute_input": "2025-01-01T00:00:00Z"}, "tags": ["exercise"]},
        ),
        new_code_cell("print('the answer is 42')", execution_count=2, metadata={"tags": ["solution-only"]}),
        new_markdown_cell(f"Why?\n\n{BEGIN_SOLUTION}\nBecause experts specialise.\n{END_SOLUTION}\n"),
        new_code_cell("check(topk_route)\n### BEGIN HIDDEN TESTS\nassert topk_route([1], 1) == [1]\n### END HIDDEN TESTS\n"),
        new_code_cell(f"{BEGIN_SOLUTION}\nanswer = 3\n{END_SOLUTION}", execution_count=3),
    ]
    return nb


def _write(path: Path, nb: nbformat.NotebookNode) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    _write(solutions / "02_sparse_gating.ipynb", _solution_notebook())
    return solutions, exercises


def _code(nb: nbformat.NotebookNode) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_regions_are_found_with_function_names():
    regions = solution_regions(_solution_notebook(), "solutions/02_sparse_gating.ipynb")
    assert [r.name for r in regions] == ["topk_route", "Gate.temperature", "Exercise 2.3", "Exercise 2.4"]
    assert [r.indent for r in regions[:2]] == [" " * 8, " " * 8]
    assert [r.cell_type for r in regions] == ["code", "code", "markdown", "code"]


def test_stub_replaces_solution_at_marker_indentation():
    ex = make_exercise(_solution_notebook(), "02_sparse_gating.ipynb")
    cell = next(c for c in ex.cells if "def topk_route" in c.source)
    lines = cell.source.splitlines()
    i = lines.index("        # YOUR CODE HERE")
    assert lines[i + 1] == '        raise NotImplementedError("topk_route: implement this")'
    assert lines[i + 2] == "    return best"  # code after the region survives
    assert "sorted(scores" not in cell.source and "math.sqrt" not in cell.source
    assert BEGIN_SOLUTION not in _code(ex) and END_SOLUTION not in _code(ex)
    assert '        raise NotImplementedError("Gate.temperature: implement this")' in lines


def test_stubbed_code_runs_and_raises_not_implemented():
    ex = make_exercise(_solution_notebook(), "02_sparse_gating.ipynb")
    cell = next(c for c in ex.cells if "def topk_route" in c.source)
    namespace: dict = {}
    exec(compile(cell.source, "<exercise>", "exec"), namespace)
    with pytest.raises(ValueError):
        namespace["topk_route"]([3, 1], 0)  # code before the region still runs
    with pytest.raises(NotImplementedError, match="topk_route: implement this"):
        namespace["topk_route"]([3, 1], 1)
    with pytest.raises(NotImplementedError, match="Gate.temperature"):
        namespace["Gate"]().temperature()


def test_solution_only_hidden_tests_and_markdown_answers_are_removed():
    ex = make_exercise(_solution_notebook(), "02_sparse_gating.ipynb")
    text = json.dumps(ex)
    assert "the answer is 42" not in text
    assert "assert topk_route([1], 1)" not in text and "HIDDEN TESTS" not in text
    assert "check(topk_route)" in _code(ex)
    assert "Because experts specialise" not in text and "YOUR ANSWER HERE" in text
    top_level = next(c for c in ex.cells if c.cell_type == "code" and "Exercise 2.4" in c.source)
    assert top_level.source == '# YOUR CODE HERE\nraise NotImplementedError("Exercise 2.4: implement this")'


def test_outputs_counts_and_widget_state_are_cleared():
    ex = make_exercise(_solution_notebook(), "02_sparse_gating.ipynb")
    for cell in ex.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert "execution" not in cell.metadata
    assert "widgets" not in ex.metadata
    assert "secret output" not in json.dumps(ex)
    assert ex.cells[3].metadata.get("tags") == ["exercise"]  # meaningful metadata is kept
    nbformat.validate(ex)


def test_header_has_colab_badge_and_guarded_install():
    ex = make_exercise(_solution_notebook(), "02_sparse_gating.ipynb")
    badge, install = ex.cells[0], ex.cells[1]
    assert badge.cell_type == "markdown"
    assert "colab.research.google.com/github/moe-course/moe-course/blob/main/exercises/02_sparse_gating.ipynb" in badge.source
    assert install.cell_type == "code"
    assert '"google.colab" in sys.modules' in install.source and "%pip install" in install.source
    assert ex.cells[2].source == "# Chapter 2"


def test_input_notebook_is_not_modified():
    nb = _solution_notebook()
    before = json.dumps(nb, sort_keys=True)
    make_exercise(nb, "02_sparse_gating.ipynb")
    assert json.dumps(nb, sort_keys=True) == before


def test_generate_writes_then_check_is_clean(dirs):
    solutions, exercises = dirs
    changed = generate(solutions, exercises)
    assert changed == [exercises / "02_sparse_gating.ipynb"]
    first = changed[0].read_bytes()
    assert generate(solutions, exercises, check=True) == []
    assert generate(solutions, exercises) == []  # deterministic: nothing to rewrite
    assert changed[0].read_bytes() == first


def test_check_mode_reports_stale_and_writes_nothing(dirs):
    solutions, exercises = dirs
    assert generate(solutions, exercises, check=True) == [exercises / "02_sparse_gating.ipynb"]
    assert not exercises.exists()

    generate(solutions, exercises)
    nb = nbformat.read(solutions / "02_sparse_gating.ipynb", as_version=4)
    nb.cells[0].source = "# Chapter 2, revised"
    _write(solutions / "02_sparse_gating.ipynb", nb)
    before = (exercises / "02_sparse_gating.ipynb").read_bytes()
    assert generate(solutions, exercises, check=True) == [exercises / "02_sparse_gating.ipynb"]
    assert (exercises / "02_sparse_gating.ipynb").read_bytes() == before


def test_hand_edited_and_orphan_exercises_are_stale(dirs):
    solutions, exercises = dirs
    generate(solutions, exercises)
    target = exercises / "02_sparse_gating.ipynb"
    target.write_text(target.read_text().replace("YOUR CODE HERE", "my answer"))
    orphan = exercises / "09_removed.ipynb"
    orphan.write_text("{}")
    assert generate(solutions, exercises, check=True) == [target, orphan]
    assert generate(solutions, exercises) == [target, orphan]
    assert not orphan.exists()
    assert generate(solutions, exercises, check=True) == []


@pytest.mark.parametrize(
    "source, problem",
    [
        (f"def f():\n    {BEGIN_SOLUTION}\n    return 1\n", "never closed"),
        (f"def f():\n    return 1\n    {END_SOLUTION}\n", "no matching BEGIN"),
        (f"{BEGIN_SOLUTION}\n{BEGIN_SOLUTION}\nx = 1\n{END_SOLUTION}\n", "cannot nest"),
        (f"{BEGIN_SOLUTION}\nx = 1\n### END HIDDEN TESTS\n", "expected"),
    ],
    ids=["unclosed", "unopened", "nested", "mismatched"],
)
def test_unbalanced_markers_name_notebook_and_cell(tmp_path, source, problem):
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# t"), new_code_cell(source)]
    _write(tmp_path / "solutions" / "03_bad.ipynb", nb)
    with pytest.raises(MarkerError, match=problem) as err:
        generate(tmp_path / "solutions", tmp_path / "exercises")
    assert "03_bad.ipynb" in str(err.value) and "cell 1" in str(err.value)
    assert not (tmp_path / "exercises" / "03_bad.ipynb").exists()


def test_notebooks_without_cell_ids_stay_valid(tmp_path):
    nb = _solution_notebook()
    nb.nbformat_minor = 4
    for cell in nb.cells:
        cell.pop("id", None)
    path = tmp_path / "solutions" / "01_old.ipynb"
    path.parent.mkdir()
    path.write_text(json.dumps(nb))
    generate(tmp_path / "solutions", tmp_path / "exercises")
    ex = nbformat.read(tmp_path / "exercises" / "01_old.ipynb", as_version=4)
    nbformat.validate(ex)
    assert ex.nbformat_minor == 4 and all("id" not in c for c in ex.cells)


def test_missing_solutions_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="solutions_dir"):
        generate(tmp_path / "nope", tmp_path / "exercises")


def test_repository_exercises_are_up_to_date():
    solutions = REPO / "solutions"
    if not any(solutions.glob("[0-9][0-9]_*.ipynb")):
        pytest.skip("no solution notebooks yet")
    stale = generate(solutions, REPO / "exercises", check=True)
    assert stale == [], f"run `moe-course exercises`; stale: {[str(p) for p in stale]}"
