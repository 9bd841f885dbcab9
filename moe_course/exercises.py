"""Generate the student notebooks in ``exercises/`` (one for each of chapters 1 to 11) from the single
source in ``solutions/``.

``solutions/NN_topic.ipynb`` holds complete, executed solutions. Code to hide sits between a line
``### BEGIN SOLUTION`` and a line ``### END SOLUTION`` (nbgrader's markers, so instructors can also
feed the solutions to nbgrader). :func:`generate` writes ``exercises/NN_topic.ipynb`` where

* each solution region in a code cell becomes ``# YOUR CODE HERE`` plus
  ``raise NotImplementedError("<function or exercise id>: implement this")`` at the marker's
  indentation (nbgrader's default stub); in a markdown cell it becomes ``YOUR ANSWER HERE``;
* ``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS`` regions are removed;
* cells tagged ``solution-only`` are dropped;
* outputs, execution counts, execution timings and ``metadata.widgets`` are cleared;
* a Colab badge and a Colab-only install cell are put at the top. A solution notebook carries the
  same two cells with its own badge (:func:`add_solution_headers` puts them there); they are
  replaced, never duplicated, so a solution with or without its header gives the same exercise.

The output is a pure function of the input bytes, so ``check=True`` compares bytes and CI fails
when someone edits a solution without regenerating (or edits an exercise by hand).
"""

from __future__ import annotations

import ast
import copy
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

__all__ = [
    "BEGIN_SOLUTION",
    "END_SOLUTION",
    "BEGIN_HIDDEN_TESTS",
    "END_HIDDEN_TESTS",
    "SOLUTION_ONLY_TAG",
    "MarkerError",
    "SolutionRegion",
    "solution_regions",
    "make_exercise",
    "generate",
    "colab_badge",
    "add_solution_headers",
]

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN_TESTS = "### BEGIN HIDDEN TESTS"
END_HIDDEN_TESTS = "### END HIDDEN TESTS"
SOLUTION_ONLY_TAG = "solution-only"
CODE_STUB = "# YOUR CODE HERE"
MARKDOWN_STUB = "YOUR ANSWER HERE"

REPO_URL = "https://github.com/moe-course/moe-course"
COLAB_URL = "https://colab.research.google.com/github/moe-course/moe-course"
BRANCH = "main"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"

BADGE_CELL_ID = "moe-course-colab-badge"
INSTALL_CELL_ID = "moe-course-colab-install"
COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# Installs the course package on Colab and does nothing anywhere else (a local checkout has it
# installed with `pip install -e .`). `%pip` inside the `if` is fine: IPython rewrites indented
# line magics too.
INSTALL_SOURCE = (
    "# On Colab, install the course package first, with its transformers bridge (chapter 12)\n"
    "# (locally: `pip install -e \".[hf]\"` in the repository).\n"
    "import sys\n"
    "\n"
    'if "google.colab" in sys.modules:\n'
    f'    %pip install -q "moe-course[hf] @ git+{REPO_URL}@{BRANCH}"'
)
_SOLUTION_NOTE = "*Solution notebook"
# A Colab badge link at the very start of a markdown cell, whatever notebook it opens.
_BADGE_RE = re.compile(
    r"\A\s*\[!\[[^\]]*\]\(" + re.escape(COLAB_BADGE_IMAGE) + r"\)\]\(https://colab\.research\.google\.com/[^)\s]*\)[ \t]*\n?"
)

_DEF_RE = re.compile(r"^(?P<indent>[ \t]*)(?:async[ \t]+)?def[ \t]+(?P<name>\w+)")
# Cell metadata that records *when* or *how* a cell ran, not what it is.
_VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")


class MarkerError(ValueError):
    """Solution or hidden-test markers that do not pair up; the message names notebook and cell."""


@dataclass(frozen=True)
class SolutionRegion:
    """One ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region of a notebook.

    ``begin`` and ``end`` are 0-based line numbers of the two marker lines inside the cell's
    source; ``indent`` is the whitespace before the BEGIN marker; ``name`` is what the stub's
    ``NotImplementedError`` message starts with (enclosing function name, else ``Exercise N.i``).
    """

    cell_index: int
    cell_type: str
    begin: int
    end: int
    indent: str
    name: str


def _source(cell: NotebookNode) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _marker(line: str) -> str | None:
    stripped = line.strip()
    for marker in (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN_TESTS, END_HIDDEN_TESTS):
        if stripped.startswith(marker):
            return marker
    return None


def _where(label: str, index: int, cell: NotebookNode) -> str:
    cell_id = cell.get("id")
    return f"{label}, cell {index}" + (f" (id {cell_id!r})" if cell_id else "")


def _pairs(lines: list[str], where: str) -> list[tuple[str, int, int]]:
    """Return ``(kind, begin_line, end_line)`` for every marker pair; raise on any imbalance."""
    pairs: list[tuple[str, int, int]] = []
    open_kind: str | None = None
    open_line = -1
    closers = {BEGIN_SOLUTION: END_SOLUTION, BEGIN_HIDDEN_TESTS: END_HIDDEN_TESTS}
    for i, line in enumerate(lines):
        marker = _marker(line)
        if marker is None:
            continue
        if marker in closers:
            if open_kind is not None:
                raise MarkerError(
                    f"{where}: {marker!r} on line {i + 1} while {open_kind!r} from line "
                    f"{open_line + 1} is still open; regions cannot nest"
                )
            open_kind, open_line = marker, i
        else:
            if open_kind is None:
                raise MarkerError(f"{where}: {marker!r} on line {i + 1} has no matching BEGIN marker")
            if closers[open_kind] != marker:
                raise MarkerError(
                    f"{where}: {marker!r} on line {i + 1} closes {open_kind!r} from line "
                    f"{open_line + 1}; expected {closers[open_kind]!r}"
                )
            pairs.append((open_kind, open_line, i))
            open_kind = None
    if open_kind is not None:
        raise MarkerError(
            f"{where}: {open_kind!r} on line {open_line + 1} is never closed by "
            f"{closers[open_kind]!r} in the same cell"
        )
    return pairs


def _enclosing_function(source: str, lines: list[str], begin: int) -> str | None:
    """Name of the innermost ``def`` around line ``begin`` (0-based), or None at top level."""
    lineno = begin + 1
    indent = len(lines[begin]) - len(lines[begin].lstrip())
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics and the like: fall back to indentation
        tree = None
    if tree is not None:
        best: str | None = None

        def visit(node: ast.AST, prefix: str) -> None:
            nonlocal best
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    qualname = f"{prefix}{child.name}"
                    end = child.end_lineno or child.lineno
                    inside = child.lineno < lineno <= end + 1 and child.col_offset < indent
                    if inside and not isinstance(child, ast.ClassDef):
                        best = qualname  # ast order is outer to inner: the innermost wins
                    visit(child, f"{qualname}." if inside else prefix)
                else:
                    visit(child, prefix)

        visit(tree, "")
        return best

    for line in reversed(lines[:begin]):
        match = _DEF_RE.match(line)
        if match and len(match.group("indent")) < indent:
            return match.group("name")
    return None


def _chapter_label(label: str) -> str:
    match = re.match(r"(\d+)_", Path(label).name)
    return str(int(match.group(1))) if match else "?"


def solution_regions(nb: NotebookNode, label: str = "notebook") -> list[SolutionRegion]:
    """List the solution regions of a solutions notebook, in order; raise :class:`MarkerError`.

    Cells tagged ``solution-only`` are skipped (they disappear whole). ``label`` names the
    notebook in error messages and supplies the chapter number of ``Exercise N.i`` ids.
    """
    regions: list[SolutionRegion] = []
    chapter = _chapter_label(label)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type not in ("code", "markdown"):
            continue
        if SOLUTION_ONLY_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        source = _source(cell)
        lines = source.splitlines(keepends=True)
        for kind, begin, end in _pairs(lines, _where(label, index, cell)):
            if kind != BEGIN_SOLUTION:
                continue
            indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
            name = None
            if cell.cell_type == "code":
                name = _enclosing_function(source, [ln.rstrip("\n") for ln in lines], begin)
            if name is None:
                name = f"Exercise {chapter}.{len(regions) + 1}"
            regions.append(SolutionRegion(index, cell.cell_type, begin, end, indent, name))
    return regions


def _stub(region: SolutionRegion, last_line_had_newline: bool) -> list[str]:
    if region.cell_type == "markdown":
        stub = [f"{region.indent}{MARKDOWN_STUB}"]
    else:
        message = f"{region.name}: implement this"
        quoted = '"' + message.replace("\\", "\\\\").replace('"', '\\"') + '"'
        stub = [f"{region.indent}{CODE_STUB}", f"{region.indent}raise NotImplementedError({quoted})"]
    out = [line + "\n" for line in stub]
    if not last_line_had_newline:
        out[-1] = out[-1].rstrip("\n")
    return out


def _strip_cell(cell: NotebookNode, regions: list[SolutionRegion], where: str) -> None:
    lines = _source(cell).splitlines(keepends=True)
    by_begin = {r.begin: r for r in regions}
    out: list[str] = []
    skip_until = -1
    for kind, begin, end in _pairs(lines, where):
        out.extend(lines[skip_until + 1 : begin])
        if kind == BEGIN_SOLUTION:
            out.extend(_stub(by_begin[begin], lines[end].endswith("\n")))
        skip_until = end
    out.extend(lines[skip_until + 1 :])
    cell.source = "".join(out)


def colab_badge(folder: str, name: str) -> str:
    """Markdown for an "Open In Colab" badge opening ``folder/name`` of the repository's main branch."""
    if folder not in ("exercises", "solutions"):
        raise ValueError(f"folder must be 'exercises' or 'solutions', got {folder!r}")
    return f"[![Open In Colab]({COLAB_BADGE_IMAGE})]({COLAB_URL}/blob/{BRANCH}/{folder}/{name})"


def _header_cells(name: str, with_ids: bool, folder: str = "exercises") -> list[NotebookNode]:
    if folder == "exercises":
        note = (
            f"*Exercise notebook generated from `solutions/{name}` by `moe-course exercises`. "
            "Fill in every `# YOUR CODE HERE`; the check cell after each exercise tells you how you did.*"
        )
    else:
        note = (
            f"{_SOLUTION_NOTE}: every exercise solved, with its outputs. This file is the source of "
            f"`exercises/{name}` (`moe-course exercises` writes it), which has the same cells with "
            "the answers left for you to write.*"
        )
    badge = nbformat.v4.new_markdown_cell(f"{colab_badge(folder, name)}\n\n{note}")
    install = nbformat.v4.new_code_cell(INSTALL_SOURCE)
    cells = [badge, install]
    for cell, cell_id in zip(cells, (BADGE_CELL_ID, INSTALL_CELL_ID)):
        if with_ids:
            cell["id"] = cell_id
        else:
            cell.pop("id", None)
    return cells


def _is_header_badge(cell: NotebookNode) -> bool:
    if cell.get("cell_type") != "markdown":
        return False
    return cell.get("id") == BADGE_CELL_ID or _BADGE_RE.match(_source(cell)) is not None


def _is_header_install(cell: NotebookNode) -> bool:
    if cell.get("cell_type") != "code":
        return False
    source = _source(cell)
    return cell.get("id") == INSTALL_CELL_ID or source == INSTALL_SOURCE


def _solution_header(nb: NotebookNode) -> dict[int, NotebookNode | None]:
    """The leading Colab header of a solution: ``{cell index: what replaces it}``.

    A badge cell of our own (its id, or nothing left but the badge and our note) and an install
    cell are dropped (``None``); an author's cell that merely starts with a Colab badge keeps the
    rest of its text.
    """
    header: dict[int, NotebookNode | None] = {}
    cells = nb.cells
    i = 0
    markers = any(_marker(line) for line in _source(cells[0]).splitlines()) if cells else False
    if cells and _is_header_badge(cells[0]) and not markers:
        rest = _BADGE_RE.sub("", _source(cells[0]), count=1).lstrip("\n")
        if rest.startswith(_SOLUTION_NOTE):  # our note is one paragraph: drop it with the badge
            rest = rest.split("\n\n", 1)[1] if "\n\n" in rest else ""
        if cells[0].get("id") == BADGE_CELL_ID or not rest.strip():
            header[0] = None
        else:
            kept = copy.deepcopy(cells[0])
            kept.source = rest
            header[0] = kept
        i = 1
    if i < len(cells) and _is_header_install(cells[i]):
        header[i] = None
    return header


def make_exercise(solution: NotebookNode, name: str, label: str | None = None) -> NotebookNode:
    """Return the student version of ``solution`` (a new notebook; the input is not modified).

    ``name`` is the file name (``NN_topic.ipynb``) the Colab badge links to; ``label`` (default
    ``name``) names the notebook in :class:`MarkerError` messages.
    """
    label = label or name
    nb = copy.deepcopy(solution)
    regions = solution_regions(nb, label)
    with_ids = nb.get("nbformat_minor", 0) >= 5

    header = _solution_header(nb)  # the solution's own badge and install cell are replaced

    cells: list[NotebookNode] = []
    for index, cell in enumerate(nb.cells):
        if index in header:
            if header[index] is None:
                continue
            cell = header[index]
        if SOLUTION_ONLY_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        if cell.cell_type in ("code", "markdown"):
            here = [r for r in regions if r.cell_index == index]
            _strip_cell(cell, here, _where(label, index, cell))
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in _VOLATILE_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
        cells.append(cell)

    nb.cells = _header_cells(name, with_ids) + cells
    if with_ids:
        for i, cell in enumerate(nb.cells):
            if not cell.get("id"):
                cell["id"] = f"cell-{i}"  # deterministic, unlike nbformat's random ids
    nb.metadata.pop("widgets", None)
    nbformat.validate(nb)
    return nb


def _render(nb: NotebookNode) -> bytes:
    text = nbformat.writes(nb, version=nbformat.NO_CONVERT)
    if not text.endswith("\n"):
        text += "\n"
    return text.encode("utf-8")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; notebooks are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(
    solutions_dir: str | os.PathLike = "solutions",
    exercises_dir: str | os.PathLike = "exercises",
    check: bool = False,
) -> list[Path]:
    """Write ``exercises_dir/NN_*.ipynb`` from ``solutions_dir/NN_*.ipynb``.

    Returns the exercise paths that changed (written, or deleted because their solution is gone).
    With ``check=True`` nothing is written and the returned list holds the stale paths: missing,
    different in any byte, or without a solution; an empty list means ``exercises_dir`` is fresh.
    Raises ``FileNotFoundError`` for a missing ``solutions_dir`` and :class:`MarkerError` for
    unbalanced markers.
    """
    solutions = Path(solutions_dir)
    exercises = Path(exercises_dir)
    if not solutions.is_dir():
        raise FileNotFoundError(f"solutions_dir must be a directory of notebooks, got {str(solutions)!r}")
    if exercises.exists() and not exercises.is_dir():
        raise NotADirectoryError(f"exercises_dir must be a directory, got file {str(exercises)!r}")

    changed: list[Path] = []
    expected: set[str] = set()
    for src in sorted(solutions.glob(NOTEBOOK_GLOB)):
        expected.add(src.name)
        nb = nbformat.read(src, as_version=4)
        data = _render(make_exercise(nb, src.name, label=str(src)))
        dst = exercises / src.name
        if dst.is_file() and dst.read_bytes() == data:
            continue
        changed.append(dst)
        if not check:
            _atomic_write(dst, data)

    if exercises.is_dir():
        for orphan in sorted(exercises.glob(NOTEBOOK_GLOB)):
            if orphan.name not in expected:
                changed.append(orphan)
                if not check:
                    orphan.unlink()
    return changed


def add_solution_headers(
    solutions_dir: str | os.PathLike = "solutions", check: bool = False
) -> list[Path]:
    """Put a Colab badge (opening the solution itself) and the Colab-only install cell at the top
    of every ``solutions_dir/NN_*.ipynb``; return the notebooks that changed (or, with
    ``check=True``, that would change; nothing is written then).

    Idempotent, and it only touches those two leading cells: an old header of ours is replaced,
    every other cell keeps its bytes, and nothing is executed (the install cell has no output, as
    it would have off Colab). The exercises generated afterwards are the same as before.
    """
    solutions = Path(solutions_dir)
    if not solutions.is_dir():
        raise FileNotFoundError(f"solutions_dir must be a directory of notebooks, got {str(solutions)!r}")
    changed: list[Path] = []
    for path in sorted(solutions.glob(NOTEBOOK_GLOB)):
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        with_ids = nb.get("nbformat_minor", 0) >= 5
        ours = [i for i, cell in _solution_header(nb).items() if cell is None]
        body = [cell for i, cell in enumerate(nb.cells) if i not in ours]
        header = _header_cells(path.name, with_ids, folder="solutions")
        for k, fresh in enumerate(header):  # an identical old cell keeps its run (count, outputs)
            old = next((nb.cells[i] for i in ours if nb.cells[i].cell_type == fresh.cell_type
                        and _source(nb.cells[i]) == fresh.source), None)
            if old is not None:
                header[k] = copy.deepcopy(old)
                if with_ids:
                    header[k]["id"] = fresh["id"]
        nb.cells = header + body
        data = _render(nb)
        if path.read_bytes() == data:
            continue
        changed.append(path)
        if not check:
            _atomic_write(path, data)
    return changed


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m moe_course.exercises",
        description="Put the Colab badge and install cell at the top of every solution notebook.",
    )
    parser.add_argument("solutions", nargs="?", default="solutions", help="default: ./solutions")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any would change")
    args = parser.parse_args(argv)
    changed = add_solution_headers(args.solutions, check=args.check)
    for path in changed:
        print(f"{'needs a header' if args.check else 'wrote'}: {path}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    raise SystemExit(_main())
