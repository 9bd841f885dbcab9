"""The website: book/ builds with warnings as errors, from stored outputs, executing nothing, with
its math bundled; and the course material it links: every chapter has an exercise and a solution
notebook, a row on the exercises page, and Colab headers that the generator handles.

The build itself is the session fixture ``built_book`` in conftest.py (shared with test_site.py,
which opens the same pages in a browser).
"""

from __future__ import annotations

import html
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from moe_course import exercises as gen

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"
SOLUTIONS = REPO / "solutions"
MATHJAX = BOOK / "_ext" / "static" / "mathjax"


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


def test_readers_never_see_test_markers(built_book):
    """``# NBVAL_CHECK_OUTPUT`` tells nbval to compare a cell's output; _ext/reader_view.py drops
    that line from the displayed code, so no page (nor the search index) shows it."""
    _, html_dir = built_book
    shown = {path.name: path.read_text(encoding="utf-8").count("NBVAL_")
             for path in [*html_dir.glob("*.html"), html_dir / "searchindex.js"]}
    shown = {name: n for name, n in shown.items() if n}
    assert not shown, f"test markers shown to readers: {shown}"


def test_marker_lines_are_dropped_and_nothing_else():
    sys.path.insert(0, str(BOOK / "_ext"))
    try:
        import reader_view
    finally:
        sys.path.remove(str(BOOK / "_ext"))
    code = 'print("NBVAL_CHECK_OUTPUT is a marker")  # a string, not the marker line'
    assert reader_view.strip_markers(code) == code
    assert reader_view.strip_markers("# NBVAL_CHECK_OUTPUT\nx = 1\nprint(x)") == "x = 1\nprint(x)"
    assert reader_view.strip_markers("x = 1\n  # NBVAL_IGNORE_OUTPUT\ny = 2") == "x = 1\ny = 2"


# --- The book speaks to readers: no words of the project's workflow, no machine paths -----------

# "~/.cache/moe_course" is the documented default cache; any other spelling of it is a machine path.
WORKFLOW_WORDS = re.compile(
    r"\bissues?\b|\baim \(|research notes|our notes|/root/|/work/|/tmp/|(?<!~)/\.cache/moe_course",
    re.IGNORECASE,
)


class _ArticleText(HTMLParser):
    """The text of a page's ``<article>``; with ``cells=False`` without code cells and their outputs."""

    def __init__(self, cells: bool):
        super().__init__()
        self.cells = cells
        self.in_article = 0
        self.divs = 0
        self.skip_from: int | None = None
        self.parts: list[str] = []

    BLOCKS = {"p", "div", "pre", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "br", "dt", "dd"}

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append(" ")  # "</pre><p>Aim" is two words
        if tag == "article":
            self.in_article += 1
        elif tag == "div":
            self.divs += 1
            classes = (dict(attrs).get("class") or "").split()
            if not self.cells and self.skip_from is None and {"cell_input", "cell_output"} & set(classes):
                self.skip_from = self.divs

    def handle_endtag(self, tag):
        if tag == "article":
            self.in_article -= 1
        elif tag == "div":
            if self.skip_from == self.divs:
                self.skip_from = None
            self.divs -= 1

    def handle_data(self, data):
        if self.in_article and self.skip_from is None and self.lasttag not in ("script", "style"):
            self.parts.append(data)


def _workflow_hits(html_dir: Path, cells: bool) -> dict[str, list[str]]:
    hits = {}
    for path in sorted(html_dir.glob("*.html")):
        parser = _ArticleText(cells)
        parser.feed(path.read_text(encoding="utf-8"))
        text = " ".join("".join(parser.parts).split())
        found = [text[max(0, m.start() - 50):m.end() + 30] for m in WORKFLOW_WORDS.finditer(text)]
        if found:
            hits[path.name] = found
    return hits


def test_prose_has_no_workflow_words_or_machine_paths(built_book):
    _, html_dir = built_book
    hits = _workflow_hits(html_dir, cells=False)
    assert not hits, f"words of the project's workflow or machine paths in the text of {hits}"


def test_code_cells_and_outputs_have_no_workflow_words_or_machine_paths(built_book):
    _, html_dir = built_book
    hits = _workflow_hits(html_dir, cells=True)
    assert not hits, f"words of the project's workflow or machine paths on {hits}"


def test_workflow_grep_finds_what_it_should():
    page = ('<article><p>See ~/.cache/moe_course.</p><div class="cell_output"><pre>/root/x</pre></div>'
            "<p>Aim (issue): met</p></article>")
    for cells, expected in ((False, ["aim (", "issue"]), (True, ["/root/", "aim (", "issue"])):
        parser = _ArticleText(cells)
        parser.feed(page)
        found = [m.group(0).lower() for m in WORKFLOW_WORDS.finditer("".join(parser.parts))]
        assert found == expected, (cells, found)


def test_bibliography_renders_entries(built_book):
    _, html_dir = built_book
    page = (html_dir / "bibliography.html").read_text(encoding="utf-8")
    for title in ("Adaptive Mixtures of Local Experts", "Switch Transformers", "Git Re-Basin"):
        assert title.lower() in page.lower()


# --- Math without network ---------------------------------------------------------------------


def test_config_points_mathjax_at_the_bundled_copy():
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    path = config["sphinx"]["config"]["mathjax_path"]
    assert "://" not in path and not path.startswith("//"), f"mathjax_path {path!r} needs the network"
    assert (MATHJAX.parent / path).is_file(), f"{path} is not bundled in {MATHJAX.parent}"
    assert "offline_assets" in config["sphinx"]["local_extensions"]
    fonts = list((MATHJAX / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert len(fonts) >= 20, "tex-chtml.js loads its woff-v2 fonts from output/chtml/fonts/woff-v2"
    assert (MATHJAX / "LICENSE").is_file()
    # Jupyter Book 1 puts every .js under book/_static on every page: MathJax must not be there.
    assert not list((BOOK / "_static").rglob("*mathjax*")), "keep MathJax out of book/_static"


def test_built_pages_load_mathjax_once_from_the_site(built_book):
    done, html_dir = built_book
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (html_dir / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert (html_dir / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2" / "MathJax_Main-Regular.woff").is_file()
    pages_with_math = 0
    for stem in _toc_files():
        page = (html_dir / f"{stem}.html").read_text(encoding="utf-8")
        scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page, flags=re.I)
        assert all("://" not in src for src in scripts), f"{stem}.html loads MathJax from {scripts}"
        assert len(scripts) <= 1, f"{stem}.html loads MathJax {len(scripts)} times: {scripts}"
        if 'class="math' in page:
            pages_with_math += 1
            assert [src.split("?")[0] for src in scripts] == ["_static/mathjax/tex-chtml.js"], (
                f"{stem}.html has math but loads MathJax from {scripts}"
            )
        assert "cdn.jsdelivr.net" not in page
    assert pages_with_math >= 5, "the chapters' equations did not reach the pages as math"


# --- Exercises, solutions and their Colab headers -----------------------------------------------


def _solution_stems() -> list[str]:
    return sorted(p.stem for p in SOLUTIONS.glob(gen.NOTEBOOK_GLOB))


def _chapter_stems() -> list[str]:
    return [stem for stem in _toc_files() if re.match(r"\d\d_", stem)]


@pytest.mark.parametrize("stem", _solution_stems())
def test_solution_notebook_starts_with_its_own_colab_header(stem):
    nb = nbformat.read(SOLUTIONS / f"{stem}.ipynb", as_version=4)
    badge, install = nb.cells[0], nb.cells[1]
    fix = "run `python -m moe_course.exercises` (adds the header, touches no other cell)"
    assert badge.cell_type == "markdown" and badge.source.startswith(gen.colab_badge("solutions", f"{stem}.ipynb")), fix
    assert install.cell_type == "code" and install.source == gen.INSTALL_SOURCE, fix
    assert sum("colab-badge.svg" in c.source for c in nb.cells if c.cell_type == "markdown") == 1
    if nb.nbformat_minor >= 5:  # stable ids: the generator finds the header by id first
        assert (badge.id, install.id) == (gen.BADGE_CELL_ID, gen.INSTALL_CELL_ID), fix


def _without_header(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    bare = nbformat.from_dict(json.loads(json.dumps(nb)))
    bare.cells = [c for c in bare.cells if c.get("id") not in (gen.BADGE_CELL_ID, gen.INSTALL_CELL_ID)]
    return bare


@pytest.mark.parametrize("stem", _solution_stems())
def test_solution_header_becomes_the_exercise_header(stem):
    """A solution with or without its Colab header gives the same bytes of exercise, which opens
    itself (not the solution) in Colab and installs the package once."""
    nb = nbformat.read(SOLUTIONS / f"{stem}.ipynb", as_version=4)
    name = f"{stem}.ipynb"
    with_header = nbformat.writes(gen.make_exercise(nb, name))
    assert with_header == nbformat.writes(gen.make_exercise(_without_header(nb), name))
    ex = gen.make_exercise(nb, name)
    text = json.dumps(ex)
    assert ex.cells[0].source.startswith(gen.colab_badge("exercises", name))
    assert f"blob/main/solutions/{name}" not in text and text.count("colab-badge.svg") == 1
    assert sum(c.source == gen.INSTALL_SOURCE for c in ex.cells) == 1


def test_add_solution_headers_is_idempotent_and_keeps_other_cells(tmp_path):
    src = SOLUTIONS / f"{_solution_stems()[0]}.ipynb"
    nb = _without_header(nbformat.read(src, as_version=nbformat.NO_CONVERT))
    nb.cells[0].source = gen.colab_badge("solutions", "other.ipynb") + "\n\n" + nb.cells[0].source  # an author's own badge
    target = tmp_path / src.name
    target.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    before = nbformat.read(target, as_version=4)
    assert gen.add_solution_headers(tmp_path, check=True) == [target]
    assert gen.add_solution_headers(tmp_path) == [target]
    after = nbformat.read(target, as_version=4)
    assert [c.get("id") for c in after.cells[:2]] == [gen.BADGE_CELL_ID, gen.INSTALL_CELL_ID]
    assert after.cells[2:] == before.cells  # every other cell as it was, outputs included
    data = target.read_bytes()
    assert gen.add_solution_headers(tmp_path) == [] and target.read_bytes() == data
    # Without our header, an author's leading badge line is replaced too; the rest of the cell stays.
    ex = gen.make_exercise(before, src.name)
    assert ex.cells[0].source.startswith(gen.colab_badge("exercises", src.name))
    assert ex.cells[2].source == before.cells[0].source.split("\n\n", 1)[1]


def test_exercise_install_cell_installs_the_package_only_on_colab():
    """Off Colab the cell runs and does nothing; on Colab it pip-installs this repository."""
    from IPython.core.inputtransformer2 import TransformerManager

    code = TransformerManager().transform_cell(gen.INSTALL_SOURCE)
    calls = []

    class FakeIPython:
        def run_line_magic(self, name, line):
            calls.append((name, line))

    assert "google.colab" not in sys.modules
    exec(compile(code, "<install>", "exec"), {"get_ipython": FakeIPython})
    assert calls == []
    try:
        sys.modules["google.colab"] = type(sys)("google.colab")
        exec(compile(code, "<install>", "exec"), {"get_ipython": FakeIPython})
    finally:
        sys.modules.pop("google.colab", None)
    assert calls == [("pip", f'install -q "moe-course[hf] @ git+{gen.REPO_URL}@{gen.BRANCH}"')]


def test_exercises_page_has_a_row_for_every_solution():
    page = (BOOK / "exercises.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    missing = []
    for stem in _solution_stems():
        number = int(stem[:2])
        row = next((r for r in rows if re.match(rf"\|\s*{number}\s*\|", r)), "")
        wanted = [
            f"]({stem}.ipynb)",
            f"{gen.COLAB_URL}/blob/{gen.BRANCH}/exercises/{stem}.ipynb",
            f"{gen.COLAB_URL}/blob/{gen.BRANCH}/solutions/{stem}.ipynb",
            f"{gen.REPO_URL}/blob/{gen.BRANCH}/exercises/{stem}.ipynb",
        ]
        if not all(w in row for w in wanted):
            missing.append(stem)
    assert not missing, f"book/exercises.md needs a complete row (chapter, exercise, solution) for {missing}"
    assert len(rows) == len(_solution_stems()), "book/exercises.md has a row without a solution notebook"


def test_every_chapter_has_a_solution_and_links_its_exercise_notebook():
    chapters = _chapter_stems()
    assert set(chapters) == set(_solution_stems()), "each chapter in _toc.yml needs solutions/<same name>.ipynb"
    lacking = []
    for stem in chapters:
        nb = nbformat.read(BOOK / f"{stem}.ipynb", as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        if f"{gen.REPO_URL}/blob/{gen.BRANCH}/exercises/{stem}.ipynb" not in text and \
                f"{gen.COLAB_URL}/blob/{gen.BRANCH}/exercises/{stem}.ipynb" not in text:
            lacking.append(stem)
    assert not lacking, f"these chapters do not link their exercise notebook: {lacking}"


def test_notation_page_follows_the_welcome_page_and_is_linked_from_it():
    files = _toc_files()
    assert files[:2] == ["index", "notation"], f"book/notation.md must come right after the welcome page: {files[:3]}"
    assert "](notation.md)" in (BOOK / "index.md").read_text(encoding="utf-8")
    page = (BOOK / "notation.md").read_text(encoding="utf-8")
    for symbol in ("$N$", "$k$", "$d$", "$f$", "$T$", r"$\tau$", "$G$", r"$W_g \in \mathbb{R}^{d \times N}$"):
        assert f"| {symbol}" in page, f"notation.md has no row for {symbol}"


def test_index_maps_every_chapter():
    index = (BOOK / "index.md").read_text(encoding="utf-8")
    unlinked = [stem for stem in _chapter_stems() if f"]({stem}.ipynb)" not in index]
    assert not unlinked, f"book/index.md's map of the course does not link {unlinked}"
