"""Shared pytest setup: GPU tests skip themselves on machines without CUDA; notebooks run in a
kernel of this very interpreter; the website is built once per session for tests/test_book.py and
tests/test_site.py."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- grading helpers
def run(check, fn):
    """``check(fn)`` without printing: the :class:`~moe_course.grading.core.CheckResult`."""
    return check(fn, quiet=True)


def stub(*args, **kwargs):
    """An exercise as handed out: its body raises NotImplementedError."""
    raise NotImplementedError("implement this")


def assert_caught(check, fn, *words):
    """``fn`` (a plausible mistake) fails ``check`` with a message that contains every word."""
    from moe_course.grading.core import ERROR, FAIL

    result = run(check, fn)
    assert result.status in (FAIL, ERROR), result
    for w in words:
        assert w in result.message, result.message
    return result


def pytest_configure(config):
    """Point the ``python3`` Jupyter kernel at this interpreter for the whole run.

    The grade runner and nbclient start the kernel *named* python3; a user-level kernel spec left by
    another virtualenv would run the notebooks with a different Python (often one without
    moe_course). ``JUPYTER_PATH`` is searched before the user's own kernel directory, so a spec
    placed there wins, and nothing outside this run changes.
    """
    kernels = Path(tempfile.mkdtemp(prefix="moe-course-jupyter-")) / "kernels" / "python3"
    kernels.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (moe-course tests)", "language": "python"}
    (kernels / "kernel.json").write_text(json.dumps(spec))
    config._moe_course_jupyter_dir = kernels.parents[1]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(kernels.parents[1])] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    )


def pytest_unconfigure(config):
    jupyter_dir = getattr(config, "_moe_course_jupyter_dir", None)
    if jupyter_dir is not None:
        shutil.rmtree(jupyter_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from 2 threads, and OpenMP's spin-waiting makes them 10-100x
    slower when another process shares the cores; restore the thread count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """Build the book ONCE per session, strictly (``moe-course book --strict``: ``-W -n
    --keep-going``), into a temporary folder; returns ``(CompletedProcess, html_dir)``.

    Session-scoped so that tests/test_book.py (the build and its pages) and tests/test_site.py
    (the same pages in a browser) share one build instead of paying for two.
    """
    pytest.importorskip("jupyter_book")
    out = tmp_path_factory.mktemp("book")
    env = {**os.environ, "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-m", "moe_course.cli", "book", "--strict", "--path-output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    return done, out / "_build" / "html"


@pytest.fixture
def without_module(monkeypatch):
    """``without_module("nbclient")`` makes ``cli.importlib.import_module`` raise ImportError for that
    name, as on a machine where the optional dependency is not installed."""
    from moe_course import cli

    real_import = cli.importlib.import_module

    def hide(missing: str) -> None:
        def fake_import(name, *args, **kwargs):
            if name == missing:
                raise ImportError(f"No module named {missing!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(cli.importlib, "import_module", fake_import)

    return hide
