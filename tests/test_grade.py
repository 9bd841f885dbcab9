"""`moe-course grade`: every way a submission can go wrong becomes a clear row, never a crash.

One class of synthetic submissions is graded once (module fixture, through the CLI) with short time
limits; each test then looks at its student's rows. The students call the real chapter-2 checkers
on tiny functions. Kernel starts dominate the time (a few seconds each on a shared machine).
"""

from __future__ import annotations

import csv
import json
import shutil

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from moe_course import cli
from moe_course.grading import runner
from moe_course.grading.runner import (
    MISSING, NOT_RUN_CELL_ERROR, NOT_RUN_KERNEL_DIED, NOT_RUN_TIMEOUT, UNREADABLE, expected_checks,
    find_submissions,
)

pytest.importorskip("nbclient")

NAME = "02_sparse_gating"
SETUP = "import torch\nfrom moe_course.grading import ch02"
TOPK = ("def topk_route(logits, k):\n    probs = torch.softmax(logits, dim=-1)\n    w, i = probs.topk(k, dim=-1)\n"
        "    return w / w.sum(dim=-1, keepdim=True), i")
LOSS = ("def switch_balance_loss(probs, indices, num_experts):\n"
        "    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype) / indices.numel()\n"
        "    return num_experts * (f * probs.mean(dim=0)).sum()")
MASK = ("def capacity_keep_mask(indices, num_experts, capacity):\n    t, k = indices.shape\n"
        "    queue = indices.t().reshape(-1)\n"
        "    pos = (torch.nn.functional.one_hot(queue, num_experts).cumsum(0) - 1).gather(1, queue[:, None]).squeeze(1)\n"
        "    return (pos < capacity).view(k, t).t()")
CHECK_TOPK = "ch02.check_topk_route(topk_route);"
CHECK_LOSS = "ch02.check_switch_balance_loss(switch_balance_loss);"
CHECK_MASK = "ch02.check_capacity_keep_mask(capacity_keep_mask);"
IDS = ["ch02.check_topk_route", "ch02.check_switch_balance_loss", "ch02.check_capacity_keep_mask"]


def notebook(*sources: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell("# Chapter 2 exercises")] + [new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


GOOD = (SETUP, TOPK, CHECK_TOPK, LOSS, CHECK_LOSS, MASK, CHECK_MASK)

SUBMISSIONS = {
    # all three correct
    "good": GOOD,
    # 2.1 imports a missing module inside the function; a top-level cell raises and another imports a
    # missing module (the notebook goes on); 2.2's check cell is deleted; 2.3 loops forever
    "faults": (SETUP, "import not_a_module_for_grading  # noqa", TOPK.replace(
        "    probs", "    import not_a_module_for_grading\n    probs"), CHECK_TOPK, "raise ValueError('boom')", LOSS,
               "def capacity_keep_mask(indices, num_experts, capacity):\n    while True:\n        pass",
               CHECK_MASK),
    # prints megabytes at top level and inside the checked function; returns a wrong type for 2.2 and
    # modifies its input in 2.3
    "chatty": (SETUP, "print('x' * 3_000_000)\nfor _ in range(2000):\n    print('y' * 1000)",
               TOPK.replace("    probs", "    print('z' * 1_000_000)\n    probs"), CHECK_TOPK,
               LOSS.replace("return num_experts * (f * probs.mean(dim=0)).sum()",
                            "return (num_experts * (f * probs.mean(dim=0)).sum()).tolist()"), CHECK_LOSS,
               MASK.replace("    t, k = indices.shape", "    t, k = indices.shape\n    indices += 0\n    indices[0] = 0"),
               CHECK_MASK),
    # an endless loop at top level after the first check: the cell timeout stops the notebook
    "hang": (SETUP, TOPK, CHECK_TOPK, "while True:\n    pass", LOSS, CHECK_LOSS, MASK, CHECK_MASK),
    # the kernel dies after the first check
    "crash": (SETUP, TOPK, CHECK_TOPK, "import os\nos._exit(1)", LOSS, CHECK_LOSS, MASK, CHECK_MASK),
    # a syntax error in the function's cell: its check cell raises NameError
    "typo": (SETUP, TOPK.replace("def topk_route(logits, k):", "def topk_route(logits, k)"), CHECK_TOPK,
             LOSS, CHECK_LOSS, MASK, CHECK_MASK),
}


def _has_python3_kernel() -> bool:
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        KernelSpecManager().get_kernel_spec("python3")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if not _has_python3_kernel():
        pytest.skip("no python3 Jupyter kernel (pip install ipykernel)")
    root = tmp_path_factory.mktemp("grade")
    reference = root / "reference"
    reference.mkdir()
    nbformat.write(notebook(*GOOD), reference / f"{NAME}.ipynb")
    subm = root / "subm"
    for student, cells in SUBMISSIONS.items():
        (subm / student).mkdir(parents=True)
        nbformat.write(notebook(*cells), subm / student / f"{NAME}.ipynb")
    (subm / "broken").mkdir()
    (subm / "broken" / f"{NAME}.ipynb").write_text('{"cells": [ this is not json')
    (subm / "good" / ".ipynb_checkpoints").mkdir()  # Jupyter's autosaves are not submissions
    shutil.copy(subm / "faults" / f"{NAME}.ipynb", subm / "good" / ".ipynb_checkpoints" / f"{NAME}.ipynb")
    out = root / "out"
    argv = ["grade", str(subm), "--reference", str(reference), "--out", str(out), "--timeout", "120",
            "--cell-timeout", "12", "--check-timeout", "2", "--max-output-bytes", "20000"]
    code = cli.main(argv)
    data = json.loads((out / "grades.json").read_text())
    rows = {(r["student"], r["exercise"]): r for r in data["results"]}
    return {"code": code, "out": out, "data": data, "rows": rows, "subm": subm, "reference": reference}


def statuses(graded, student):
    return [graded["rows"][(student, i)]["status"] for i in IDS]


def test_every_student_has_one_row_per_expected_exercise(graded):
    students = {s for s, _ in graded["rows"]}
    assert students == set(SUBMISSIONS) | {"broken"}
    assert len(graded["data"]["results"]) == 3 * len(students)
    assert graded["code"] == 1  # some exercises fail


def test_correct_solutions_pass(graded):
    assert statuses(graded, "good") == ["pass", "pass", "pass"]
    assert graded["data"]["summary"]["students"]["good"] == {"passed": 3, "total": 3}


def test_missing_module_error_deleted_cell_and_endless_loop(graded):
    rows = [graded["rows"][("faults", i)] for i in IDS]
    assert [r["status"] for r in rows] == ["error", MISSING, "timed out"]
    assert "`not_a_module_for_grading`" in rows[0]["message"]
    assert "timed out after 2 s" in rows[2]["message"]
    run = next(r for r in graded["data"]["notebooks"] if r["student"] == "faults")
    errors = " ".join(e["error"] for e in run["cell_errors"])
    assert "ModuleNotFoundError" in errors and "ValueError: boom" in errors


def test_megabytes_of_output_are_capped_and_other_faults_reported(graded):
    rows = [graded["rows"][("chatty", i)] for i in IDS]
    assert rows[0]["status"] == "pass"
    assert rows[1]["status"] == "fail" and "float" in rows[1]["message"]
    assert rows[2]["status"] == "fail" and "modified its input `indices`" in rows[2]["message"]
    executed = graded["out"] / "executed" / "chatty" / f"{NAME}.ipynb"
    assert executed.stat().st_size < 200_000
    assert "output of this cell beyond 20000 bytes was dropped" in executed.read_text()
    assert (graded["out"] / "grades.json").stat().st_size < 50_000


def test_endless_top_level_loop_stops_at_the_cell_timeout(graded):
    assert statuses(graded, "hang") == ["pass", NOT_RUN_TIMEOUT, NOT_RUN_TIMEOUT]
    assert "time limit (12 s)" in graded["rows"][("hang", IDS[1])]["message"]


def test_kernel_death_is_reported(graded):
    assert statuses(graded, "crash") == ["pass", NOT_RUN_KERNEL_DIED, NOT_RUN_KERNEL_DIED]


def test_a_failing_function_cell_leaves_its_check_not_run_with_the_error(graded):
    row = graded["rows"][("typo", IDS[0])]
    assert row["status"] == NOT_RUN_CELL_ERROR and "NameError" in row["message"]
    assert statuses(graded, "typo")[1:] == ["pass", "pass"]


def test_invalid_json_is_unreadable(graded):
    assert statuses(graded, "broken") == [UNREADABLE] * 3
    assert "cannot read the notebook" in graded["rows"][("broken", IDS[0])]["message"]


def test_reports_csv_summary_and_json(graded):
    out = graded["out"]
    with open(out / "grades.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(runner.CSV_COLUMNS)
    assert {(r["student"], r["exercise"]): r["status"] for r in rows} == {
        k: v["status"] for k, v in graded["rows"].items()}
    with open(out / "summary.csv", newline="") as f:
        summary = {r["student"]: r for r in csv.DictReader(f)}
    assert summary["good"]["passed"] == "3" and summary["good"][IDS[0]] == "pass"
    assert summary["faults"][IDS[1]] == MISSING
    exercises = graded["data"]["summary"]["exercises"]
    assert exercises[IDS[0]] == {"title": "Exercise 2.1: topk_route", "passed": 4, "total": 7}


def test_printed_summary_and_exit_code_0_when_all_pass(graded, tmp_path, capsys):
    code = cli.main(["grade", str(graded["subm"] / "good"), "--reference", str(graded["reference"]),
                     "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "graded 1 notebook(s) of 1 student(s)" in out
    assert "good     3/3" in out and "Exercise 2.1: topk_route" in out


# ---------------------------------------------------------------------------- no kernel needed
def test_student_ids_from_directories_and_file_names(tmp_path):
    refs = {NAME: tmp_path / f"{NAME}.ipynb", "01_dense_moe": tmp_path / "01_dense_moe.ipynb"}
    layout = ["subm/alice/02_sparse_gating.ipynb", "subm/bob/hw/01_dense_moe.ipynb",
              "subm/carol_02_sparse_gating.ipynb", "subm/dave-01_dense_moe (1).ipynb", "subm/notes.ipynb",
              "subm/alice/.ipynb_checkpoints/02_sparse_gating-checkpoint.ipynb", "erin/02_sparse_gating.ipynb"]
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    subs = find_submissions([tmp_path / "subm", tmp_path / "erin" / f"{NAME}.ipynb"], refs)
    got = {(s.student, s.notebook, s.reference is not None) for s in subs}
    assert got == {("alice", NAME, True), ("bob", "01_dense_moe", True), ("carol", NAME, True),
                   ("dave", "01_dense_moe", True), ("notes", "notes", False), ("erin", NAME, True)}


def test_expected_checks_ignore_comments_and_follow_imports():
    nb = notebook("from moe_course.grading import ch02\nch02.check_topk_route(f)\n# ch02.check_capacity_keep_mask(g)",
                  "from moe_course.grading.ch03 import check_perplexity\ncheck_perplexity(p)",
                  "ch02.check_topk_route(f2)")
    assert expected_checks(nb) == ["ch02.check_topk_route", "ch03.check_perplexity"]
    assert runner.check_title("ch02.check_topk_route") == "Exercise 2.1: topk_route"
    assert runner.check_title("ch99.check_nothing") == "ch99.check_nothing"


@pytest.mark.parametrize("argv, words", [
    (["grade", "{tmp}/missing"], "no such file or directory"),
    (["grade", "{tmp}/file.txt"], "expected .ipynb"),
    (["grade", "{tmp}/empty"], "no .ipynb notebooks found"),
    (["grade", "{tmp}/empty", "--reference", "{tmp}/nope"], "--reference must be a directory"),
    (["grade", "{tmp}/empty", "--out", "{tmp}/file.txt"], "--out must be a directory"),
])
def test_grade_usage_errors_exit_2_in_one_line(tmp_path, capsys, argv, words):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    code = cli.main([a.format(tmp=tmp_path) for a in argv] + (["--out", str(tmp_path / "o")] if "--out" not in argv
                                                               else []))
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and err.count("\n") == 1 and err.startswith("moe-course grade: error:")


@pytest.mark.parametrize("option", ["--timeout", "--cell-timeout", "--max-output-bytes", "--jobs"])
def test_grade_rejects_non_positive_limits(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grade", str(tmp_path), option, "0"])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_grade_without_nbclient_asks_for_it(tmp_path, without_module, capsys):
    without_module("nbclient")
    (tmp_path / "a.ipynb").write_text("{}")
    assert cli.main(["grade", str(tmp_path / "a.ipynb"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install nbclient" in capsys.readouterr().err


def test_parallel_jobs_give_the_same_rows_in_the_same_order(graded, tmp_path):
    subm = tmp_path / "subm"
    for student in ("typo", "good"):
        shutil.copytree(graded["subm"] / student, subm / student, ignore=shutil.ignore_patterns(".*"))
    report = runner.grade([subm], reference_dir=graded["reference"], jobs=2, check_timeout=5)
    assert [(r.student, r.status) for r in report.rows] == [
        (s, graded["rows"][(s, i)]["status"]) for s in ("good", "typo") for i in IDS]


def test_missing_notebooks_and_students_are_rows_and_fail_the_run(tmp_path, capsys):
    """Two assignments; alice hands in both (one wrong answer), bob one, carol (on the roster) none."""
    if not _has_python3_kernel():
        pytest.skip("no python3 Jupyter kernel (pip install ipykernel)")
    reference = tmp_path / "solutions"
    reference.mkdir()
    nbformat.write(notebook(*GOOD), reference / f"{NAME}.ipynb")
    nbformat.write(notebook(SETUP, TOPK, CHECK_TOPK), reference / "05_more.ipynb")
    subm = tmp_path / "subm"
    wrong_topk = TOPK.replace("return w / w.sum(dim=-1, keepdim=True), i", "return w, i")  # not renormalised
    for student, name, cells in [("alice", NAME, GOOD), ("alice", "05_more", (SETUP, wrong_topk, CHECK_TOPK)),
                                 ("bob", NAME, GOOD)]:
        (subm / student).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook(*cells), subm / student / f"{name}.ipynb")
    roster = tmp_path / "roster.txt"
    roster.write_text("# class of 2026\nalice\nbob\n\ncarol  # dropped the course?\n")
    out = tmp_path / "out"
    code = cli.main(["grade", str(subm), "--reference", str(reference), "--roster", str(roster), "--out", str(out),
                     "--cell-timeout", "60", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 1
    rows = {(r["student"], r["notebook"], r["exercise"]): r for r in json.loads((out / "grades.json").read_text())["results"]}
    assert rows[("alice", NAME, IDS[0])]["status"] == "pass"
    assert rows[("alice", "05_more", IDS[0])]["status"] == "fail"
    assert rows[("bob", "05_more", IDS[0])]["status"] == MISSING
    assert rows[("bob", "05_more", IDS[0])]["message"] == "notebook not handed in"
    assert {rows[("carol", NAME, i)]["status"] for i in IDS} == {MISSING}
    assert rows[("carol", "05_more", IDS[0])]["message"] == "no notebooks handed in"
    assert len(rows) == 3 * 4  # every student x every expected exercise, exactly once
    summary = list(csv.reader((out / "summary.csv").open()))
    assert [line[0] for line in summary[1:]] == ["alice", "bob", "carol"]
    assert "missing work:" in printed and "carol: 02_sparse_gating.ipynb: no notebooks handed in" in printed
    assert f"reference notebooks: {reference} (--reference)" in printed


def test_default_reference_is_the_solutions_next_to_the_graded_notebooks(tmp_path, monkeypatch):
    checkout = tmp_path / "other-checkout"
    (checkout / "solutions").mkdir(parents=True)
    (checkout / "exercises").mkdir()
    nbformat.write(notebook(*GOOD), checkout / "solutions" / f"{NAME}.ipynb")
    monkeypatch.chdir(tmp_path)  # not inside any checkout: the installed package's must not be used
    found, how = cli._default_reference([str(checkout / "exercises")])
    assert found == checkout / "solutions" and "next to" in how


@pytest.mark.parametrize("argv, words", [
    (["--notebooks", "99_nope"], "notebooks: 99_nope not among the reference notebooks"),
    (["--roster", "no-such-roster.txt"], "--roster must be a text file"),
])
def test_grade_bad_roster_or_notebooks_exit_2(tmp_path, capsys, argv, words):
    reference = tmp_path / "solutions"
    reference.mkdir()
    nbformat.write(notebook(*GOOD), reference / f"{NAME}.ipynb")
    nbformat.write(notebook(*GOOD), tmp_path / f"{NAME}.ipynb")
    code = cli.main(["grade", str(tmp_path / f"{NAME}.ipynb"), "--reference", str(reference),
                     "--out", str(tmp_path / "out"), *argv])
    assert code == 2
    assert words in capsys.readouterr().err
