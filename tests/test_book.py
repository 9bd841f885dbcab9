"""The website: book/ builds with warnings as errors, from stored outputs, executing nothing."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"


def _toc_files() -> list[str]:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def _source(stem: str) -> Path:
    for suffix in (".ipynb", ".md"):
        if (BOOK / f"{stem}{suffix}").is_file():
            return BOOK / f"{stem}{suffix}"
    raise AssertionError(f"_toc.yml lists {stem!r} but book/{stem}.ipynb or .md does not exist")


def _notebooks() -> list[Path]:
    return [p for p in map(_source, _toc_files()) if p.suffix == ".ipynb"]


def test_toc_and_pages_match():
    listed = {_source(stem).name for stem in _toc_files()}
    on_disk = {p.name for p in BOOK.iterdir() if p.suffix in (".ipynb", ".md")}
    # only_build_toc_files silently skips unlisted pages: every page must be in the TOC.
    assert on_disk == listed, f"not in _toc.yml: {sorted(on_disk - listed)}"


def test_config_never_executes_and_fails_on_errors():
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["execute"]["timeout"] >= 600
    assert config["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    assert config["only_build_toc_files"] is True
    assert config["launch_buttons"]["colab_url"] == ""


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_chapter_was_executed_top_to_bottom(path):
    """The build shows stored outputs, so every code cell must have run, in order, in one kernel."""
    nb = nbformat.read(path, as_version=4)
    counts = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        assert cell.execution_count is not None, f"{path.name} cell {i} was never executed"
        counts.append(cell.execution_count)
        tags = cell.metadata.get("tags", [])
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors or "raises-exception" in tags, f"{path.name} cell {i} stored an error"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{path.name}: execution counts {counts} are out of order; restart the kernel and run all"
    )
    widgets = nb.metadata.get("widgets")
    if widgets is not None:  # GitHub refuses to render widget metadata without "state"
        assert "state" in widgets.get("application/vnd.jupyter.widget-state+json", {})


def _first_plain_output_line(nb: nbformat.NotebookNode) -> str | None:
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text") if out.output_type == "stream" else out.get("data", {}).get("text/plain")
            for line in (text or "").splitlines():
                if len(line.strip()) >= 4 and re.fullmatch(r"[\w .,:;=()\[\]+-]+", line.strip()):
                    return line.strip()
    return None


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    pytest.importorskip("jupyter_book")
    out = tmp_path_factory.mktemp("book")
    env = {**os.environ, "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-m", "moe_course.cli", "book", "--strict", "--path-output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    return done, out / "_build" / "html"


def test_book_builds_without_warnings(built_book):
    done, html_dir = built_book
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    assert "-W -n --keep-going" in log
    assert "WARNING" not in log, log[-5000:]
    for stem in _toc_files():
        assert (html_dir / f"{stem}.html").is_file(), f"{stem}.html missing"


def test_book_build_executes_nothing_and_shows_stored_outputs(built_book):
    done, html_dir = built_book
    log = done.stdout + done.stderr
    assert "Executing notebook" not in log and "Executed notebook" not in log
    for path in _notebooks():
        line = _first_plain_output_line(nbformat.read(path, as_version=4))
        if line is None:
            continue
        page = (html_dir / f"{path.stem}.html").read_text(encoding="utf-8")
        assert html.escape(line, quote=False) in page, f"stored output {line!r} missing from {path.stem}.html"


def test_bibliography_renders_entries(built_book):
    _, html_dir = built_book
    page = (html_dir / "bibliography.html").read_text(encoding="utf-8")
    for title in ("Adaptive Mixtures of Local Experts", "Switch Transformers", "Git Re-Basin"):
        assert title.lower() in page.lower()
