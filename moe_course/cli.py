"""The ``moe-course`` command: build the book, regenerate exercises, check the environment.

    moe-course book [--strict]          # jupyter-book build book/ (from stored outputs)
    moe-course exercises [--check]      # exercises/ from solutions/
    moe-course doctor                   # versions, device, cache, cached zoo models
    moe-course --version
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from moe_course import __version__

__all__ = ["main", "find_repo_root", "find_book_dir", "cache_dir"]

DEFAULT_ZOO_MODELS = ("shakespeare-moe", "mnist1d-moe")
# Runs jupyter-book's click entry point with this interpreter, so the book is built by the
# environment that has moe_course installed (a stray `jupyter-book` on PATH may not).
_JB_LAUNCHER = (
    "import sys; from jupyter_book.cli.main import main; sys.argv[0] = 'jupyter-book'; sys.exit(main())"
)


class UsageError(Exception):
    """A bad path or a missing tool: reported in one line, exit code 2."""


def _is_repo_root(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "moe_course").is_dir()


def find_repo_root(start: str | os.PathLike | None = None) -> Path | None:
    """The course checkout containing ``start`` (default: the current directory), else the
    checkout this package was installed from in editable mode, else None."""
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if _is_repo_root(candidate):
            return candidate
    package_parent = Path(__file__).resolve().parent.parent
    return package_parent if _is_repo_root(package_parent) else None


def find_book_dir(book_dir: str | os.PathLike | None = None) -> Path:
    """The Jupyter Book source directory: ``book_dir`` if given, else ``<repo>/book``."""
    if book_dir is not None:
        path = Path(book_dir)
        if not (path / "_config.yml").is_file() or not (path / "_toc.yml").is_file():
            raise UsageError(f"--book-dir must contain _config.yml and _toc.yml, got {str(path)!r}")
        return path
    root = find_repo_root()
    if root is None or not (root / "book" / "_toc.yml").is_file():
        raise UsageError(
            "no book/ directory found: run this inside the moe-course repository or pass --book-dir"
        )
    return root / "book"


def cache_dir() -> Path:
    """Where the zoo caches trained models: ``$MOE_COURSE_CACHE``, else ``~/.cache/moe_course``."""
    env = os.environ.get("MOE_COURSE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moe_course"


def _cmd_book(args: argparse.Namespace) -> int:
    book = find_book_dir(args.book_dir)
    try:
        importlib.import_module("jupyter_book")
    except ImportError:
        raise UsageError(
            'jupyter-book is not installed: install the [book] extra, e.g. pip install -e ".[book]"'
        ) from None
    cmd = [sys.executable, "-c", _JB_LAUNCHER, "build", str(book)]
    if args.strict:
        cmd += ["-W", "-n", "--keep-going"]
    if args.all:
        cmd.append("--all")
    if args.path_output is not None:
        cmd += ["--path-output", str(args.path_output)]
    env = dict(os.environ)
    # Static pages cannot show widget progress bars or open windows.
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    print("$ jupyter-book " + " ".join(cmd[3:]), flush=True)
    return subprocess.call(cmd, env=env)


def _cmd_exercises(args: argparse.Namespace) -> int:
    from moe_course.exercises import MarkerError, generate

    root = find_repo_root()
    if root is None and (args.solutions is None or args.exercises is None):
        raise UsageError(
            "no repository found: run this inside the moe-course repository or pass "
            "--solutions and --exercises"
        )
    solutions = Path(args.solutions) if args.solutions is not None else root / "solutions"
    exercises = Path(args.exercises) if args.exercises is not None else root / "exercises"
    if not solutions.is_dir():
        raise UsageError(f"--solutions must be a directory of notebooks, got {str(solutions)!r}")
    if exercises.exists() and not exercises.is_dir():
        raise UsageError(f"--exercises must be a directory, got file {str(exercises)!r}")
    try:
        changed = generate(solutions, exercises, check=args.check)
    except MarkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.check:
        if changed:
            print(f"{len(changed)} exercise notebook(s) out of date with {solutions}:", file=sys.stderr)
            for path in changed:
                print(f"  {path}", file=sys.stderr)
            print("run `moe-course exercises` and commit the result", file=sys.stderr)
            return 1
        print(f"{exercises} is up to date with {solutions}")
        return 0
    for path in changed:
        print(f"wrote {path}" if path.exists() else f"removed {path}")
    if not changed:
        print(f"{exercises} was already up to date")
    return 0


def _version_of(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def _cmd_doctor(args: argparse.Namespace) -> int:
    print(f"moe-course   {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"platform     {platform.platform()}")
    try:
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
        print(f"torch        {torch.__version__} (CUDA: {cuda}, threads: {torch.get_num_threads()})")
    except ImportError:
        print("torch        not installed")
    try:
        from moe_course.device import default_preset, get_device

        device = get_device()
        print(f"device       {device} (preset: {default_preset(device)})")
    except Exception as err:  # the device module may be mid-rewrite or torch may be missing
        print(f"device       unavailable ({type(err).__name__}: {err})")
    for dist in ("datasets", "jupyter-book", "nbval"):
        print(f"{dist:<12} {_version_of(dist)}")

    try:
        zoo = importlib.import_module("moe_course.zoo")
    except Exception:
        print(f"cache        {cache_dir()}")
        print("zoo          zoo not available")
        return 0
    where = zoo.cache_dir() if hasattr(zoo, "cache_dir") else cache_dir()
    print(f"cache        {where}")
    names = getattr(zoo, "NAMES", None) or DEFAULT_ZOO_MODELS
    for name in names:
        try:
            cached = zoo.is_cached(name, "auto")
            state = "cached" if cached else "not cached (trains on first use)"
        except Exception as err:
            state = f"unknown ({type(err).__name__}: {err})"
        print(f"zoo          {name}: {state}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-course",
        description="Tools for the moe-course book, exercises and environment.",
    )
    parser.add_argument("--version", action="version", version=f"moe-course {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    book = sub.add_parser(
        "book",
        help="build the website into book/_build/html",
        description="Build the Jupyter Book from the notebooks' stored outputs (nothing is executed).",
    )
    book.add_argument("--book-dir", metavar="DIR", help="book source (default: book/ of this repository)")
    book.add_argument("--strict", action="store_true", help="warnings are errors (-W -n --keep-going)")
    book.add_argument("--all", action="store_true", help="rebuild every page, not only changed ones")
    book.add_argument("--path-output", metavar="DIR", help="write _build/ here instead of the book dir")
    book.set_defaults(func=_cmd_book)

    ex = sub.add_parser(
        "exercises",
        help="regenerate exercises/ from solutions/",
        description="Write exercises/NN_*.ipynb from solutions/NN_*.ipynb (stubs replace solutions).",
    )
    ex.add_argument("--check", action="store_true", help="write nothing; exit 1 if exercises/ is stale")
    ex.add_argument("--solutions", metavar="DIR", help="source notebooks (default: <repo>/solutions)")
    ex.add_argument("--exercises", metavar="DIR", help="output directory (default: <repo>/exercises)")
    ex.set_defaults(func=_cmd_exercises)

    doctor = sub.add_parser(
        "doctor",
        help="print versions, device, cache directory and cached models",
        description="Print what the course will run on: versions, device, preset, cache, zoo models.",
    )
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moe-course`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"moe-course {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
