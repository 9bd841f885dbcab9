"""Sphinx extension: the site as a reader meets it, on a desktop and on a phone.

* **One working menu button, one search bar.** pydata-sphinx-theme 0.17 fills the option
  ``navbar_persistent`` with ``["search-button-field"]`` whenever the *user* did not set it
  (``pydata_sphinx_theme.update_config``), ignoring the empty value that sphinx-book-theme 1.3
  declares in its ``theme.conf``. The theme pair is the one sphinx-book-theme 1.3.0 pins
  (``pydata-sphinx-theme==0.17.1``); the override alone breaks it: pydata then renders its own
  top header, with a second search bar on desktop and a second, hidden ``.primary-toggle`` button
  *before* the book theme's visible one. Both themes' scripts attach the sidebar toggle to
  ``document.querySelector(".primary-toggle")``, the first in the page, so the visible menu button
  did nothing at any width. Setting ``navbar_persistent = []`` here (before the themes'
  ``builder-inited`` handlers run) removes that header: one search bar, and the visible button is
  the only ``.primary-toggle`` (tests/test_site.py clicks it at 1400 and 400 px).
* **Results shown whole** (``static/reader.css``): text outputs wrap instead of scrolling
  sideways, so a wide ``print`` shows all of its result; HTML tables get compact cells that may
  wrap. A table or equation that still does not fit a phone's screen scrolls inside its own box,
  never the page.
* **No test markers for readers.** Cells whose output nbval compares start with the comment line
  ``# NBVAL_CHECK_OUTPUT`` (``--nbval-lax`` reads it from the source). The notebooks keep it;
  the website drops that line from every displayed code cell (``literal_block`` nodes of
  myst-nb's cell sources), at build time.
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes

STATIC = Path(__file__).resolve().parent / "static"
CSS = "reader.css"
# Lines that only instruct the test runner: nbval's markers, alone on their line.
MARKER_LINE = re.compile(r"^[ \t]*#[ \t]*NBVAL_[A-Z_]+[ \t]*(?:\r?\n|$)", re.MULTILINE)


def _theme_options(app, config) -> None:
    options = dict(config.html_theme_options or {})
    options.setdefault("navbar_persistent", [])
    config.html_theme_options = options


def _add_static_path(app, config) -> None:
    if str(STATIC) not in config.html_static_path:
        config.html_static_path = [*config.html_static_path, str(STATIC)]


def strip_markers(text: str) -> str:
    """``text`` without its nbval marker lines (and without the blank line they leave on top)."""
    stripped = MARKER_LINE.sub("", text)
    return stripped.lstrip("\n") if stripped != text else text


def _hide_markers(app, doctree: nodes.document) -> None:
    for block in doctree.findall(nodes.literal_block):
        parent = block.parent
        # myst-nb puts each cell's source in a container of type "cell_input"; outputs are left as
        # they are (a printed marker would be a result).
        if parent is None or parent.get("nb_element") != "cell_code_source":
            continue
        text = block.astext()
        new = strip_markers(text)
        if new != text:
            block.children = [nodes.Text(new)]
            block["rawsource"] = new


def setup(app):
    app.connect("config-inited", _theme_options)
    app.connect("config-inited", _add_static_path)
    app.add_css_file(CSS)
    app.connect("doctree-read", _hide_markers)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
