"""Sphinx extension: the website needs no network to show its math and its badges.

* **MathJax** 3.2.2 (``tex-chtml.js`` and its woff-v2 fonts, from the npm package ``mathjax``,
  Apache-2.0, see ``static/mathjax/LICENSE``) ships in ``static/mathjax/``; ``_config.yml`` points
  ``mathjax_path`` at it. Sphinx's default loads MathJax from a CDN, so equations stayed raw
  ``$$`` offline. The files live here, not in ``book/_static/``, because Jupyter Book 1 adds
  every ``.js`` file under ``book/_static`` to *every* page (``jupyter_book/config.py``), which
  would load MathJax a second time, unconfigured. This extension adds ``static/`` to
  ``html_static_path`` itself, after Jupyter Book has built its configuration.
  ``tex-chtml.js`` already holds the TeX packages ``base``, ``ams``, ``newcommand``,
  ``noundefined``, ``require``, ``autoload`` and ``configmacros``; a macro from another package
  (``\\boldsymbol``, ``\\cancel``, ``\\color`` ...) makes MathJax fetch
  ``mathjax/input/tex/extensions/<name>.js``: copy that file from the same npm package
  (tests/test_site.py fails on the missing request and names it).
* **Colab badges**: chapters link their exercise notebooks with the usual badge image
  ``https://colab.research.google.com/assets/colab-badge.svg``. In the HTML the image is
  replaced by a local look-alike (``static/colab-badge.svg``); the link still opens Colab. The
  notebooks themselves keep the remote image (GitHub and Colab show it).
* **One copy of each inline script**: Sphinx 7.4 re-adds the inline scripts that extensions
  register (``app.add_js_file(None, body=...)``) with filename ``''`` instead of ``None``
  (``StandaloneHTMLBuilder.prepare_writing``), so ``const THEBE_JS_URL = ...`` (sphinx-thebe) ran
  twice on every page and threw "Identifier 'THEBE_JS_URL' has already been declared". Later
  copies are dropped from each page's script list.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes

STATIC = Path(__file__).resolve().parent / "static"
REMOTE_COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_COLAB_BADGE = "_static/colab-badge.svg"


def _add_static_path(app, config) -> None:
    if str(STATIC) not in config.html_static_path:
        config.html_static_path = [*config.html_static_path, str(STATIC)]


def _local_badges(app, doctree: nodes.document, docname: str) -> None:
    if app.builder.format != "html":
        return
    # After the image collector ran (doctree-read), so Sphinx neither copies nor checks it.
    prefix = "../" * docname.count("/")
    for image in doctree.findall(nodes.image):
        if image.get("uri") == REMOTE_COLAB_BADGE:
            image["uri"] = prefix + LOCAL_COLAB_BADGE


def _script_key(script) -> tuple:
    attributes = getattr(script, "attributes", {})
    return (getattr(script, "filename", script) or "", tuple(sorted(attributes.items())))


def _unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique  # a new list: the builder's own list stays as it was


def setup(app):
    app.connect("config-inited", _add_static_path)
    app.connect("doctree-resolved", _local_badges)
    app.connect("html-page-context", _unique_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
