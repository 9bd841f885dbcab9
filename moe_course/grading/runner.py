"""Grade a folder of students' exercise notebooks (the exercises of chapters 1 to 11): the engine
behind ``moe-course grade``.

Each notebook is executed top to bottom in a **fresh** ``python3`` kernel (nbclient), with a time
limit per cell and per notebook. The notebook's own check cells
(``from moe_course.grading import ch02; ch02.check_topk_route(topk_route)``) do the grading: every
checker appends its :class:`~moe_course.grading.core.CheckResult` as a JSON line to the file named
by ``$MOE_COURSE_GRADE_LOG``, which the runner sets for the kernel, so nothing depends on parsing
printed output.

The exercises a notebook *should* contain come from the reference notebook with the same file
name (``solutions/02_sparse_gating.ipynb`` by default): the check calls in its code cells. Every
expected exercise gets exactly one row, whatever the submission did:

=========================  ===========================================================================
status                     meaning
=========================  ===========================================================================
a checker's status         the check ran and reported ``pass``, ``fail``, ``error``, ``not implemented``
                           or ``timed out`` (see :mod:`moe_course.grading.core`)
missing                    the submission has no cell calling this check (deleted or renamed)
not run: cell error        the check cell raised before the check ran (e.g. NameError: the function's
                           cell failed), the error is in the message
not run: timeout           the notebook (``timeout``) or one cell (``cell_timeout``) ran out of time
                           before this check
not run: kernel died       the kernel crashed (out of memory, ``os._exit``, a segfault) before this check
not run                    the cell ran without error but the check never reported (call commented
                           out, or guarded by an ``if``); exercise ``(none)``: no check call found at all
unreadable                 the file is not valid JSON / not a notebook / larger than 50 MB
not run: grader error      the runner itself failed on this notebook (a bug: please report it)
=========================  ===========================================================================

Missing work: every student who handed in anything, and every name of an optional roster, gets a
``missing`` row for each expected exercise of every expected notebook they did not hand in
(expected notebooks: the ones named, else every reference notebook anybody handed in).

Student ids: a notebook found in a sub-directory of a directory given on the command line belongs
to that sub-directory's name (``subm/alice/02_sparse_gating.ipynb`` -> ``alice``, also for deeper
nesting ``subm/alice/hw2/...``). A notebook directly in a given directory, or given as a file, is
named after the part of its file name before the reference name (``alice_02_sparse_gating.ipynb``
or ``alice-02_sparse_gating.ipynb`` -> ``alice``); a file named exactly like the reference takes
its parent directory's name; any other file its own stem.

Outputs are capped while they arrive (``max_output_bytes`` per cell), so a notebook printing
gigabytes costs time, not memory; the executed notebooks (capped) are saved for inspection.
Submissions run as the current user with full access to the machine: grade untrusted code
inside a container or a throw-away account.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .core import (
    ERROR, FAIL, GRADE_LOG_ENV, NOT_IMPLEMENTED, PASS, TIMEOUT, TIMEOUT_ENV,
)

__all__ = [
    "MISSING", "NOT_RUN", "NOT_RUN_CELL_ERROR", "NOT_RUN_TIMEOUT", "NOT_RUN_KERNEL_DIED", "UNREADABLE",
    "GRADER_ERROR", "Submission", "Row", "NotebookRun", "GradeReport", "find_submissions", "expected_checks",
    "grade_notebook", "grade", "write_reports", "format_summary", "read_roster",
]

MISSING = "missing"
NOT_RUN = "not run"
NOT_RUN_CELL_ERROR = "not run: cell error"
NOT_RUN_TIMEOUT = "not run: timeout"
NOT_RUN_KERNEL_DIED = "not run: kernel died"
UNREADABLE = "unreadable"
GRADER_ERROR = "not run: grader error"

DEFAULT_TIMEOUT = 600.0
DEFAULT_CELL_TIMEOUT = 300.0
DEFAULT_CHECK_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT_BYTES = 100_000
MAX_MESSAGE = 500
KERNEL_NAME = "python3"
MAX_NOTEBOOK_BYTES = 50_000_000

_CHECK_CALL = re.compile(r"\b(ch\d\d)\s*\.\s*(check_\w+)\s*\(")
_BARE_CALL = re.compile(r"(?<![.\w])(check_\w+)\s*\(")
_FROM_IMPORT = re.compile(r"from\s+moe_course\.grading\.(ch\d\d)\s+import\s+([\w\s,()]+)")


@dataclass
class Submission:
    """One notebook to grade: who handed it in, where it is, and its reference (if any)."""

    student: str
    path: Path
    notebook: str  # the reference's stem ("02_sparse_gating"), else the file's stem
    reference: Path | None = None


@dataclass
class Row:
    student: str
    notebook: str
    exercise: str  # the check id, e.g. "ch02.check_topk_route"
    title: str
    status: str
    message: str
    seconds: float | None = None
    file: str = ""


@dataclass
class NotebookRun:
    student: str
    notebook: str
    file: str
    outcome: str = "ok"  # ok | timeout | kernel died | unreadable | grader error
    detail: str = ""
    seconds: float = 0.0
    cell_errors: list = field(default_factory=list)
    executed: str = ""


@dataclass
class GradeReport:
    rows: list[Row]
    runs: list[NotebookRun]
    seconds: float
    settings: dict

    @property
    def all_passed(self) -> bool:
        return bool(self.rows) and all(r.status == PASS for r in self.rows)

    def per_student(self) -> dict[str, tuple[int, int]]:
        return dict(sorted(_tally(self.rows, key=lambda r: r.student).items()))

    def per_exercise(self) -> dict[str, tuple[int, int]]:
        return _tally(self.rows, key=lambda r: r.exercise)

    def to_dict(self) -> dict:
        titles = {r.exercise: r.title for r in self.rows}
        return {
            "settings": self.settings,
            "seconds": round(self.seconds, 2),
            "summary": {
                "students": {s: {"passed": p, "total": t} for s, (p, t) in self.per_student().items()},
                "exercises": {e: {"title": titles[e], "passed": p, "total": t}
                              for e, (p, t) in self.per_exercise().items()},
            },
            "notebooks": [asdict(r) for r in self.runs],
            "results": [asdict(r) for r in self.rows],
        }


def _tally(rows: Iterable[Row], key: Callable[[Row], str]) -> dict[str, tuple[int, int]]:
    """(passed, total) per key, counting each (student, exercise) once, by its best row."""
    best: dict[tuple[str, str], bool] = {}
    group: dict[tuple[str, str], str] = {}
    for r in rows:
        k = (r.student, r.exercise)
        best[k] = best.get(k, False) or r.status == PASS
        group[k] = key(r)
    out: dict[str, list[int]] = {}
    for k, passed in best.items():
        entry = out.setdefault(group[k], [0, 0])
        entry[0] += int(passed)
        entry[1] += 1
    return {g: (p, t) for g, (p, t) in out.items()}  # first-seen order: the notebook's order of exercises


def _short(text, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 25] + f" ... [{len(text) - limit + 25} more]"


# ------------------------------------------------------------------------------ finding notebooks
def _skip(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).parts
    return any(p.startswith(".") or p == "__pycache__" for p in rel[:-1]) or rel[-1].startswith(".")


def _match_reference(stem: str, references: dict[str, Path]) -> str | None:
    if stem in references:
        return stem
    hits = [ref for ref in references if ref in stem]
    return max(hits, key=len) if hits else None


def _from_file_name(path: Path, references: dict[str, Path]) -> tuple[str, str]:
    ref = _match_reference(path.stem, references)
    if ref is None:
        return path.stem, path.stem
    prefix = path.stem[: path.stem.index(ref)].strip(" -_.")
    return (prefix or path.parent.resolve().name or path.stem), ref


def find_submissions(paths: Sequence[str | os.PathLike], references: dict[str, Path] | None = None,
                     exclude: Sequence[Path] = ()) -> list[Submission]:
    """The notebooks under ``paths`` (files, or directories searched recursively, skipping hidden
    directories such as ``.ipynb_checkpoints``) with their student ids (see the module docstring).

    Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` for a file that
    is not an ``.ipynb``.
    """
    references = references or {}
    excluded = [Path(p).resolve() for p in exclude]
    found: list[Submission] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {str(path)!r}")
        if path.is_file():
            if path.suffix != ".ipynb":
                raise ValueError(f"expected .ipynb notebooks or directories, got {str(path)!r}")
            candidates = [(path, None)]
        else:
            candidates = [(p, path) for p in sorted(path.rglob("*.ipynb")) if p.is_file() and not _skip(p, path)]
        for nb, root in candidates:
            resolved = nb.resolve()
            if resolved in seen or any(resolved.is_relative_to(e) for e in excluded):
                continue
            seen.add(resolved)
            rel = nb.relative_to(root).parts if root is not None else ()
            if len(rel) >= 2:
                student = rel[0]
                ref = _match_reference(nb.stem, references)
                notebook = ref or nb.stem
            else:
                student, notebook = _from_file_name(nb, references)
            found.append(Submission(student, nb, notebook, references.get(notebook)))
    return found


def reference_notebooks(reference_dir: str | os.PathLike | None) -> dict[str, Path]:
    """``{stem: path}`` of the reference notebooks in ``reference_dir`` (non-recursive)."""
    if reference_dir is None:
        return {}
    return {p.stem: p for p in sorted(Path(reference_dir).glob("*.ipynb"))}


# ------------------------------------------------------------------------------ expected checks
def _code_lines(source: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in source.splitlines())


def _checks_in(source: str) -> list[str]:
    code = _code_lines(source)
    ids = [f"{m.group(1)}.{m.group(2)}" for m in _CHECK_CALL.finditer(code)]
    imported = {}
    for m in _FROM_IMPORT.finditer(code):
        for name in re.findall(r"check_\w+", m.group(2)):
            imported[name] = m.group(1)
    ids += [f"{imported[m.group(1)]}.{m.group(1)}" for m in _BARE_CALL.finditer(code) if m.group(1) in imported]
    return list(dict.fromkeys(ids))


def expected_checks(nb) -> list[str]:
    """The check ids (``"ch02.check_topk_route"``) called in a notebook's code cells, in order."""
    ids: list[str] = []
    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            ids += [i for i in _checks_in(_source(cell)) if i not in ids]
    return ids


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _check_cells(nb, ids: Iterable[str]) -> dict[str, list[int]]:
    where: dict[str, list[int]] = defaultdict(list)
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") == "code":
            for i in _checks_in(_source(cell)):
                where[i].append(index)
    return {i: where.get(i, []) for i in ids}


def check_title(check_id: str) -> str:
    """The exercise title of a check id (``"Exercise 2.1: topk_route"``), else the id itself."""
    import importlib

    module, _, name = check_id.partition(".")
    try:
        return getattr(importlib.import_module(f"moe_course.grading.{module}"), name).check_name
    except Exception:  # an unknown or broken grader module: the id is still a usable title
        return check_id


# ------------------------------------------------------------------------------ execution
def _client_class():
    from nbclient import NotebookClient
    from nbformat import v4
    from traitlets import Integer

    class CappedClient(NotebookClient):
        """Keeps at most ``max_output_bytes`` of output per cell; the rest is counted, then dropped."""

        max_output_bytes = Integer(DEFAULT_MAX_OUTPUT_BYTES).tag(config=True)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._used: dict[int, int] = {}
            self._dropped: dict[int, int] = {}

        def output(self, outs, msg, display_id, cell_index):
            content = msg.get("content", {})
            if msg["msg_type"] == "error":
                content["evalue"] = _short(content.get("evalue", ""), 2000)
                tb = content.get("traceback", [])
                content["traceback"] = [t[:2000] for t in tb[-10:]]
                return super().output(outs, msg, display_id, cell_index)
            size = len(content.get("text", "")) + sum(len(str(v)) for v in content.get("data", {}).values())
            used = self._used.get(cell_index, 0)
            if used + size > self.max_output_bytes:
                if cell_index not in self._dropped:
                    outs.append(v4.new_output("stream", name="stderr", text=(
                        f"\n[moe-course grade: output of this cell beyond {self.max_output_bytes} bytes "
                        "was dropped]\n")))
                self._dropped[cell_index] = self._dropped.get(cell_index, 0) + size
                return None
            self._used[cell_index] = used + size
            return super().output(outs, msg, display_id, cell_index)

    return CappedClient


def _kernel_env(log: Path, check_timeout: float | None) -> dict[str, str]:
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    # Grade with the very moe_course that runs the grader, wherever the kernel starts.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    env[GRADE_LOG_ENV] = str(log)
    env[TIMEOUT_ENV] = str(check_timeout if check_timeout is not None else 0)
    env.setdefault("TQDM_DISABLE", "1")
    env["MPLBACKEND"] = "Agg"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("JPY_PARENT_PID", None)
    return env


def _rows_without_results(sub: Submission, ids: list[str], status: str, message: str) -> list[Row]:
    return [Row(sub.student, sub.notebook, i, check_title(i), status, message, None, str(sub.path)) for i in ids]


def grade_notebook(sub: Submission, *, timeout: float = DEFAULT_TIMEOUT, cell_timeout: float = DEFAULT_CELL_TIMEOUT,
                   check_timeout: float | None = DEFAULT_CHECK_TIMEOUT,
                   max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                   executed_dir: Path | None = None) -> tuple[NotebookRun, list[Row]]:
    """Execute one submission in a fresh kernel and return its run record and one row per exercise.

    Never raises for anything the notebook does; a failure of the runner itself becomes rows with
    status :data:`GRADER_ERROR`.
    """
    start = time.monotonic()
    run = NotebookRun(sub.student, sub.notebook, str(sub.path))
    try:
        rows = _grade(sub, run, timeout, cell_timeout, check_timeout, max_output_bytes, executed_dir)
    except Exception as err:  # noqa: BLE001 - one bad notebook must not stop the class's grading
        run.outcome, run.detail = "grader error", _short(f"{type(err).__name__}: {err}")
        ids = _expected_for(sub, None)
        rows = _rows_without_results(sub, ids, GRADER_ERROR, run.detail)
    run.seconds = round(time.monotonic() - start, 2)
    return run, rows


def _expected_for(sub: Submission, nb) -> list[str]:
    if sub.reference is not None:
        try:
            import nbformat

            return expected_checks(nbformat.read(sub.reference, as_version=4))
        except Exception:
            pass
    return expected_checks(nb) if nb is not None else []


def _grade(sub: Submission, run: NotebookRun, timeout: float, cell_timeout: float, check_timeout: float | None,
           max_output_bytes: int, executed_dir: Path | None) -> list[Row]:
    import nbformat
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    try:
        size = sub.path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            raise ValueError(f"{size} bytes, more than the {MAX_NOTEBOOK_BYTES} a submission may have")
        nb = nbformat.read(sub.path, as_version=4)
        if not isinstance(nb.get("cells"), list):
            raise ValueError("no list of cells")
    except Exception as err:  # not JSON, not a notebook, not readable
        run.outcome = "unreadable"
        run.detail = _short(f"cannot read the notebook ({type(err).__name__}: {err})")
        ids = _expected_for(sub, None)
        if not ids:
            return [Row(sub.student, sub.notebook, "(notebook)", "", UNREADABLE, run.detail, None, str(sub.path))]
        return _rows_without_results(sub, ids, UNREADABLE, run.detail)

    ids = _expected_for(sub, nb)
    cells_of = _check_cells(nb, ids)
    for cell in nb.cells:  # stale outputs from the student's own run must not count
        if cell.get("cell_type") == "code":
            cell.outputs, cell.execution_count = [], None

    errors: dict[int, tuple[str, str]] = {}
    stopped: tuple[int, str] | None = None

    def on_cell_executed(cell, cell_index, execute_reply):
        content = (execute_reply or {}).get("content", {})
        if content.get("status") == "error":
            errors[cell_index] = (content.get("ename", "Error"), _short(content.get("evalue", ""), 300))

    with tempfile.TemporaryDirectory(prefix="moe-grade-") as work:
        log = Path(work) / "grade_log.jsonl"
        cwd = Path(work) / "cwd"
        cwd.mkdir()
        client = _client_class()(
            nb, timeout=int(math.ceil(cell_timeout)), kernel_name=KERNEL_NAME, allow_errors=True,
            record_timing=False, shutdown_kernel="immediate", startup_timeout=120,
            max_output_bytes=int(max_output_bytes), resources={"metadata": {"path": str(cwd)}},
            on_cell_executed=on_cell_executed,
        )
        deadline = time.monotonic() + timeout
        kernel_stderr = open(Path(work) / "kernel_stderr.log", "wb")  # the kernel's own chatter, not the cells'
        with kernel_stderr, client.setup_kernel(env=_kernel_env(log, check_timeout), stderr=kernel_stderr):
            for index, cell in enumerate(nb.cells):
                if cell.get("cell_type") != "code":
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    stopped = (index, "timeout")
                    break
                client.timeout = max(1, int(math.ceil(min(cell_timeout, remaining))))
                try:
                    client.execute_cell(cell, index)
                except CellTimeoutError:
                    limit = "cell" if client.timeout >= cell_timeout else "notebook"
                    stopped = (index, "timeout")
                    run.detail = (f"cell {index + 1} ran past the {limit} time limit "
                                  f"({cell_timeout if limit == 'cell' else timeout:g} s); later cells were not run")
                    break
                except DeadKernelError:
                    stopped = (index, "kernel died")
                    run.detail = (f"the kernel died while running cell {index + 1} (out of memory, os._exit, a "
                                  "crash); later cells were not run")
                    break
        if stopped is not None and stopped[1] == "kernel died":
            said = (Path(work) / "kernel_stderr.log").read_bytes()[-300:].decode("utf-8", "replace").strip()
            if said:
                run.detail += f" [kernel stderr: {_short(said, 200)}]"
        if stopped is not None:
            run.outcome = stopped[1]
            if not run.detail:
                run.detail = f"the notebook ran past its time limit ({timeout:g} s) before cell {stopped[0] + 1}"
        run.cell_errors = [{"cell": i + 1, "error": f"{e}: {v}"} for i, (e, v) in sorted(errors.items())]
        logged = _read_log(log)

    if executed_dir is not None:
        target = executed_dir / _safe(sub.student) / sub.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        run.executed = str(target)

    rows: list[Row] = []
    for check_id in ids:
        results = [r for r in logged if r.get("check_id") == check_id]
        if results:
            rows.append(_row_from_result(sub, check_id, results))
            continue
        cells = cells_of.get(check_id, [])
        if not cells:
            status, message = MISSING, "no cell of the notebook calls this check (deleted or renamed?)"
        elif stopped is not None and all(c >= stopped[0] for c in cells):
            status = NOT_RUN_TIMEOUT if stopped[1] == "timeout" else NOT_RUN_KERNEL_DIED
            message = run.detail
        elif any(c in errors for c in cells):
            c = next(c for c in cells if c in errors)
            status, message = NOT_RUN_CELL_ERROR, f"cell {c + 1} raised {errors[c][0]}: {errors[c][1]}"
        else:
            status, message = NOT_RUN, "the check cell ran but the check never reported (commented out or skipped?)"
        rows.append(Row(sub.student, sub.notebook, check_id, check_title(check_id), status, _short(message), None,
                        str(sub.path)))
    if not ids and not logged:
        rows.append(Row(sub.student, sub.notebook, "(none)", "", NOT_RUN,
                        "no check call found in this notebook or in its reference notebook", None, str(sub.path)))
    for check_id in dict.fromkeys(r.get("check_id", "?") for r in logged):
        if check_id not in ids:
            results = [r for r in logged if r.get("check_id") == check_id]
            row = _row_from_result(sub, check_id, results)
            row.message = _short("(not in the reference notebook) " + row.message)
            rows.append(row)
    return rows


def _row_from_result(sub: Submission, check_id: str, results: list[dict]) -> Row:
    last = results[-1]  # the state the notebook ended in
    status = last.get("status") if last.get("status") in (PASS, FAIL, ERROR, NOT_IMPLEMENTED, TIMEOUT) else ERROR
    message = str(last.get("message", ""))
    if len(results) > 1:
        message = f"(checked {len(results)} times, last result) {message}"
    seconds = last.get("seconds")
    return Row(sub.student, sub.notebook, check_id, str(last.get("name") or check_title(check_id)), status,
               _short(message), float(seconds) if isinstance(seconds, (int, float)) else None, str(sub.path))


def _read_log(log: Path, limit: int = 10_000) -> list[dict]:
    """The JSON lines a notebook's checks wrote; lines that are not JSON objects are ignored."""
    out: list[dict] = []
    if not log.exists():
        return out
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read(20_000_000)  # bounded, whatever the notebook wrote there
    for line in text.splitlines()[:limit]:
        try:
            entry = json.loads(line) if len(line) < 100_000 else None
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "student"


# ------------------------------------------------------------------------------ the whole class
def grade(paths: Sequence[str | os.PathLike], *, reference_dir: str | os.PathLike | None = None,
          out_dir: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT,
          cell_timeout: float = DEFAULT_CELL_TIMEOUT, check_timeout: float | None = DEFAULT_CHECK_TIMEOUT,
          max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, jobs: int = 1,
          roster: Sequence[str] | None = None, notebooks: Sequence[str] | None = None,
          progress: Callable[[str], None] | None = None) -> GradeReport:
    """Grade every notebook under ``paths``; write ``grades.csv``, ``summary.csv``, ``grades.json``
    and ``executed/<student>/*.ipynb`` into ``out_dir`` when given. See the module docstring.

    Missing work is reported, never skipped: every student (those who handed something in, plus
    ``roster``) gets a ``missing`` row for each expected exercise of each expected notebook they did
    not hand in. The expected notebooks are ``notebooks`` (reference stems such as
    ``"02_sparse_gating"``), else every reference notebook that any student handed in.

    ``jobs`` > 1 grades that many notebooks at once, each in its own worker process and kernel
    (rows keep the order of the notebooks); time limits are per notebook either way.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    for name, value in (("timeout", timeout), ("cell_timeout", cell_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if check_timeout is not None and check_timeout < 0:
        raise ValueError(f"check_timeout must be >= 0 seconds (0: no limit), got {check_timeout!r}")
    if not max_output_bytes > 0:
        raise ValueError(f"max_output_bytes must be a positive number of bytes, got {max_output_bytes!r}")
    references = reference_notebooks(reference_dir)
    roster = _check_names(roster, "roster")
    notebooks = _check_names(notebooks, "notebooks")
    unknown = [n for n in notebooks if n not in references]
    if unknown:
        raise ValueError(f"notebooks: {', '.join(unknown)} not among the reference notebooks "
                         f"({', '.join(references) or 'none: pass a reference directory'})")
    out = Path(out_dir) if out_dir is not None else None
    submissions = find_submissions(paths, references, exclude=[out] if out is not None else [])
    if not submissions and not roster:
        raise ValueError(f"no .ipynb notebooks found under {', '.join(map(str, paths))}")
    start = time.monotonic()
    options = dict(timeout=timeout, cell_timeout=cell_timeout, check_timeout=check_timeout,
                   max_output_bytes=max_output_bytes, executed_dir=out / "executed" if out is not None else None)
    results: list[tuple[NotebookRun, list[Row]] | None] = [None] * len(submissions)

    def done(n: int, sub: Submission, result: tuple[NotebookRun, list[Row]]) -> None:
        results[n] = result
        if progress is not None:
            run, sub_rows = result
            passed = sum(r.status == PASS for r in sub_rows)
            note = "" if run.outcome == "ok" else f" ({run.outcome})"
            progress(f"[{sum(r is not None for r in results)}/{len(submissions)}] {sub.student}: {sub.path}: "
                     f"{passed}/{len(sub_rows)} passed in {run.seconds:.1f} s{note}")

    if jobs == 1 or len(submissions) == 1:
        for n, sub in enumerate(submissions):
            done(n, sub, grade_notebook(sub, **options))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: a fresh interpreter per worker (forking a process that holds zmq sockets is unsafe)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(grade_notebook, sub, **options): n for n, sub in enumerate(submissions)}
            for future in as_completed(futures):
                n = futures[future]
                try:
                    result = future.result()
                except Exception as err:  # noqa: BLE001 - a worker crashed: that notebook's rows say so
                    sub = submissions[n]
                    run = NotebookRun(sub.student, sub.notebook, str(sub.path), "grader error",
                                      _short(f"worker failed: {type(err).__name__}: {err}"))
                    result = (run, _rows_without_results(sub, _expected_for(sub, None), GRADER_ERROR, run.detail))
                done(n, submissions[n], result)
    runs = [r[0] for r in results]
    rows = [row for r in results for row in r[1]]
    expected = list(notebooks) or [n for n in references if any(sub.notebook == n for sub in submissions)]
    missing_runs, missing_rows = _missing_work(submissions, roster, expected, references)
    runs += missing_runs
    rows += missing_rows
    settings = {"paths": [str(p) for p in paths], "reference_dir": str(reference_dir) if reference_dir else None,
                "expected_notebooks": expected, "roster": list(roster),
                "timeout": timeout, "cell_timeout": cell_timeout, "check_timeout": check_timeout,
                "max_output_bytes": max_output_bytes, "jobs": jobs, "kernel": KERNEL_NAME,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    report = GradeReport(rows, runs, time.monotonic() - start, settings)
    if out is not None:
        write_reports(report, out)
    return report


def _check_names(names: Sequence[str] | None, what: str) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{what} must be a list of non-empty names, got {names!r}")
    return list(dict.fromkeys(n.strip() for n in names))


def read_roster(path: str | os.PathLike) -> list[str]:
    """Student ids, one per line; blank lines and ``#`` comments are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return list(dict.fromkeys(line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()))


def _missing_work(submissions: list[Submission], roster: list[str], expected: list[str],
                  references: dict[str, Path]) -> tuple[list[NotebookRun], list[Row]]:
    """``missing`` rows for every expected notebook a student (or a roster name) did not hand in."""
    import nbformat

    handed_in = {(sub.student, sub.notebook) for sub in submissions}
    students = list(dict.fromkeys([sub.student for sub in submissions] + roster))
    checks = {name: expected_checks(nbformat.read(references[name], as_version=4)) for name in expected}
    runs, rows = [], []
    for student in students:
        for name in expected:
            if (student, name) in handed_in:
                continue
            why = "no notebooks handed in" if not any(s == student for s, _ in handed_in) else "notebook not handed in"
            runs.append(NotebookRun(student, name, "", MISSING, f"{name}.ipynb: {why}"))
            rows += [Row(student, name, c, check_title(c), MISSING, why, None, "") for c in checks[name]]
    return runs, rows


CSV_COLUMNS = ("student", "notebook", "exercise", "title", "status", "message", "seconds", "file")


def write_reports(report: GradeReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``grades.csv`` (one row per student and exercise), ``summary.csv`` (students x exercises,
    cells = status) and ``grades.json`` (everything, with per-notebook run records)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "grades.csv", "summary": out / "summary.csv", "json": out / "grades.json"}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in report.rows:
            writer.writerow(asdict(row))
    exercises = list(dict.fromkeys(r.exercise for r in report.rows))
    table: dict[str, dict[str, str]] = defaultdict(dict)
    for r in report.rows:
        if table[r.student].get(r.exercise) != PASS:
            table[r.student][r.exercise] = r.status
    per_student = report.per_student()
    with open(paths["summary"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["student", *exercises, "passed", "total"])
        for student in sorted(table):
            passed, total = per_student[student]
            writer.writerow([student, *(table[student].get(e, "") for e in exercises), passed, total])
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    return paths


def format_summary(report: GradeReport) -> str:
    """Pass counts per student and per exercise, then what went wrong per notebook."""
    lines = []
    students = report.per_student()
    width = max([len(s) for s in students] + [7])
    lines.append(f"{'student':<{width}}  passed")
    for student, (passed, total) in students.items():
        statuses = Counter(r.status for r in report.rows if r.student == student and r.status != PASS)
        other = ", ".join(f"{n} {s}" for s, n in statuses.most_common())
        lines.append(f"{student:<{width}}  {passed}/{total}" + (f"  ({other})" if other else ""))
    lines.append("")
    titles = {r.exercise: r.title for r in report.rows}
    exercises = report.per_exercise()
    width = max([len(titles[e]) for e in exercises] + [8])
    lines.append(f"{'exercise':<{width}}  passed")
    for exercise, (passed, total) in exercises.items():
        lines.append(f"{titles[exercise]:<{width}}  {passed}/{total}")
    problems = [r for r in report.runs if r.outcome not in ("ok", MISSING) or r.cell_errors]
    absent = [r for r in report.runs if r.outcome == MISSING]
    if absent:
        lines.append("")
        lines.append("missing work:")
        lines += [f"  {r.student}: {r.detail}" for r in absent]
    if problems:
        lines.append("")
        lines.append("notebook problems:")
        for r in problems:
            what = [f"{r.outcome}: {r.detail}"] if r.outcome != "ok" else []
            if r.cell_errors:
                first = r.cell_errors[0]
                what.append(f"{len(r.cell_errors)} cell(s) raised, first: cell {first['cell']} {first['error']}")
            lines.append(f"  {r.student} {Path(r.file).name}: " + _short("; ".join(what), 300))
    return "\n".join(lines)
