"""Every chapter follows one template (DESIGN.md, "One chapter template"), checked on the source
notebooks so that a new chapter is held to it the moment it is added to book/.

The template, in reading order:

* ``# N. Title``, then a "Learning goals" admonition (a list) and a ``**Prerequisites:**`` line
  that links the notation page;
* numbered sections ``## N.1``, ``## N.2``, ... (sub-sections ``###`` are free);
* 2-3 "Try it" admonitions inside the chapter;
* a "Paper vs. this course" admonition in every chapter whose sources report headline numbers;
* ``## Takeaways`` (a list), then ``## Exercises`` with the Colab badge of the chapter's exercise;
* sources cited with ``{cite}`` and keys that exist in references.bib;
* code the reader needs: no test markers in the source (they are cell tags), lines of at most
  88 characters, tables shown as HTML (no ``.to_string()``), every figure-drawing cell collapsed
  (``hide-input`` or ``remove-input``), and the figures really stored in the notebook.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"
CHAPTERS = sorted(p for p in BOOK.glob("[0-9][0-9]_*.ipynb"))
# Chapters whose sources report headline numbers that ours can be set against.
PAPER_BOXES = {4: "NAEE", 8: "MC-SMoE", 9: "He et al.", 10: "μMoE"}
BIB_KEYS = set(re.findall(r"@\w+\{([^,\s]+),", (BOOK / "references.bib").read_text(encoding="utf-8")))
MAX_LINE = 88


def _cells(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _markdown(path: Path) -> str:
    return "\n\n".join("".join(c["source"]) for c in _cells(path) if c["cell_type"] == "markdown")


def _number(path: Path) -> int:
    return int(path.name[:2])


def _admonitions(md: str, title: str) -> list[str]:
    """Bodies of ```{admonition} <title> / :::{admonition} <title> blocks."""
    pat = re.compile(r"(```+|:::+)\{admonition\}\s*" + re.escape(title) + r"[^\n]*\n(.*?)\n\1", re.S)
    return [m.group(2) for m in pat.finditer(md)]


def _h2(md: str) -> list[str]:
    out, fence = [], None
    for line in md.splitlines():
        m = re.match(r"^(```+|:::+)", line)
        if m:
            fence = None if fence and line.startswith(fence) and line.strip() == fence else (fence or m.group(1))
            continue
        if fence is None and line.startswith("## "):
            out.append(line[3:].strip())
    return out


def test_there_are_chapters():
    assert len(CHAPTERS) >= 11


@pytest.fixture(params=CHAPTERS, ids=lambda p: p.stem)
def chapter(request):
    return request.param


def test_title_learning_goals_and_prerequisites(chapter):
    n, md = _number(chapter), _markdown(chapter)
    assert re.match(rf"# {n}\. \S", md), f"{chapter.name}: the first line must be '# {n}. Title'"
    goals = _admonitions(md, "Learning goals")
    assert goals and re.search(r"^\s*[-*] ", goals[0], re.M), (
        f"{chapter.name}: needs a 'Learning goals' admonition with a list")
    prereq = re.search(r"^\*\*Prerequisites:?\*\*:?(.*?)(?:\n\s*\n|\Z)", md, re.M | re.S)
    assert prereq, f"{chapter.name}: needs a '**Prerequisites:**' paragraph"
    assert "notation" in prereq.group(1), f"{chapter.name}: the prerequisites line links the notation page"


def test_sections_are_numbered_then_takeaways_then_exercises(chapter):
    n, heads = _number(chapter), _h2(_markdown(chapter))
    assert heads[-2:] == ["Takeaways", "Exercises"], (
        f"{chapter.name}: the last two sections must be 'Takeaways' and 'Exercises', got {heads[-2:]}")
    numbered = heads[:-2]
    want = [f"{n}.{i}" for i in range(1, len(numbered) + 1)]
    got = [h.split(" ", 1)[0] for h in numbered]
    assert numbered and got == want, f"{chapter.name}: sections must be numbered {want}, got {numbered}"


def test_two_or_three_try_it_prompts(chapter):
    k = len(_admonitions(_markdown(chapter), "Try it"))
    assert 2 <= k <= 3, f"{chapter.name}: {k} 'Try it' admonitions, the template asks for 2-3"


def test_paper_vs_this_course_box(chapter):
    n = _number(chapter)
    if n not in PAPER_BOXES:
        pytest.skip("no headline numbers in this chapter's sources")
    boxes = _admonitions(_markdown(chapter), "Paper vs. this course")
    assert boxes, f"{chapter.name}: needs a 'Paper vs. this course' admonition ({PAPER_BOXES[n]})"


def test_takeaways_is_a_list_and_exercises_have_the_colab_badge(chapter):
    md = _markdown(chapter)
    take = md.split("## Takeaways", 1)[1].split("## Exercises", 1)[0]
    assert len(re.findall(r"^\s*[-*] ", take, re.M)) >= 3, f"{chapter.name}: Takeaways needs a list (3+ items)"
    ex = md.split("## Exercises", 1)[1]
    assert "colab-badge.svg" in ex and f"exercises/{chapter.name}" in ex, (
        f"{chapter.name}: the Exercises section needs the Colab badge of exercises/{chapter.name}")


def test_sources_are_cited_with_known_keys(chapter):
    md = _markdown(chapter)
    keys = [k.strip() for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", md) for k in group.split(",")]
    assert keys, f"{chapter.name}: cites nothing with {{cite}}"
    unknown = sorted(set(keys) - BIB_KEYS)
    assert not unknown, f"{chapter.name}: cite keys missing from references.bib: {unknown}"
    assert "slide deck" not in md.lower(), f"{chapter.name}: name the lecture slides and cite them"


def test_code_is_what_the_reader_needs(chapter):
    problems = []
    for i, c in enumerate(_cells(chapter)):
        if c["cell_type"] != "code":
            continue
        src, tags = "".join(c["source"]), c.get("metadata", {}).get("tags", [])
        if re.search(r"^\s*#\s*NBVAL_", src, re.M):
            problems.append(f"cell {i}: test marker in the source (use a nbval-* cell tag)")
        long = [ln for ln in src.splitlines() if len(ln) > MAX_LINE]
        if long:
            problems.append(f"cell {i}: {len(long)} line(s) over {MAX_LINE} characters: {long[0][:60]}...")
        if ".to_string(" in src:
            problems.append(f"cell {i}: a table printed as text (display an HTML table instead)")
        draws = any("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
                    for o in c.get("outputs", []))
        if draws and not {"hide-input", "remove-input"} & set(tags):
            problems.append(f"cell {i}: draws a figure but its code is not collapsed (hide-input tag)")
    assert not problems, f"{chapter.name}:\n  " + "\n  ".join(problems)


def _png_width(b64: str) -> int:
    import base64
    import struct

    return struct.unpack(">I", base64.b64decode(b64[:64])[16:20])[0]


def test_figures_are_readable_at_page_width(chapter):
    """The column is about 800 px wide: a wider figure is scaled down and its 10 pt text with it;
    a dpi under 100 shrinks the text too (the course style sets 100 dpi and 10 pt)."""
    problems = []
    for i, c in enumerate(_cells(chapter)):
        if c["cell_type"] != "code":
            continue
        if re.search(r"dpi\s*=\s*[1-9][0-9]?\b", "".join(c["source"])):
            problems.append(f"cell {i}: dpi under 100")
        for o in c.get("outputs", []):
            png = o.get("data", {}).get("image/png")
            if png and _png_width(png) > 800:
                problems.append(f"cell {i}: a figure {_png_width(png)} px wide (at most 800)")
    assert not problems, f"{chapter.name}:\n  " + "\n  ".join(problems)


def test_figures_are_stored(chapter):
    """A chapter that plots must carry its figures (an executor with MPLBACKEND=Agg stores none)."""
    cells = _cells(chapter)
    plots = any(re.search(r"\bplt\.|\bviz\.plot_|\.plot\(", "".join(c["source"])) for c in cells
                if c["cell_type"] == "code")
    images = sum("image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
                 for c in cells for o in c.get("outputs", []))
    if plots:
        assert images, f"{chapter.name}: plots but stores no figure; re-run it with `moe-course execute`"
