"""The ``moe-course`` command (chapter 0, how to run the course): build the book, regenerate
exercises, check the environment, print the compression table, grade students' notebooks.

    moe-course book [--strict] [--all]          # jupyter-book build book/ (from stored outputs)
    moe-course exercises [--check]              # exercises/ from solutions/
    moe-course doctor                           # environment problems (codecs, torch, kernel, cache) + fixes
    moe-course table --model NAME [--quick]     # compression comparison: table, CSV, PNG frontier
    moe-course grade PATH... [--out DIR]        # run students' notebooks, collect the check results
    moe-course execute NOTEBOOK...              # re-execute chapters/solutions in place, figures kept
    moe-course --version

Exit codes (every command):

    0  success (``grade``: every expected exercise of every notebook passed)
    1  the command ran but found a problem: ``exercises --check`` stale, ``book`` build failed,
       ``doctor`` found an environment problem,
       ``grade`` some exercise did not pass, ``table`` the measurement failed
    2  usage error: unknown command or option, bad path, unknown model name, missing tool;
       one line on stderr, ``moe-course COMMAND: error: ...``

``moe-course grade``: see :mod:`moe_course.grading.runner` for how notebooks are executed, how
student ids are derived and what each status means.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from moe_course import __version__

__all__ = ["main", "find_repo_root", "find_book_dir", "cache_dir"]

DEFAULT_ZOO_MODELS = ("shakespeare-moe", "mnist1d-moe", "digits-moe")
TABLE_MODELS = ("shakespeare-moe", "mnist1d-moe", "digits-moe")  # mirrors moe_course.course_table.TABLE_MODELS (not imported: torch)
EXIT_CODES = """exit codes:
  0  success{extra0}
  1  {extra1}
  2  usage error (bad option, path or name): one line on stderr"""
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


def _cmd_execute(args: argparse.Namespace) -> int:
    """Execute notebooks in place, top to bottom, in a fresh kernel of THIS interpreter.

    The stored outputs are what the website shows, so figures must be kept: matplotlib's inline
    backend is forced (an inherited ``MPLBACKEND=Agg`` once left every chapter without figures).
    """
    try:
        nbformat = importlib.import_module("nbformat")
        nbclient = importlib.import_module("nbclient")
    except ImportError:
        raise UsageError('nbclient is not installed: install the [dev] extra, e.g. pip install -e ".[dev]"') from None
    paths = [Path(p) for p in args.notebooks]
    for p in paths:
        if p.suffix != ".ipynb" or not p.is_file():
            raise UsageError(f"NOTEBOOK must be an existing .ipynb file, got {str(p)!r}")
    import tempfile
    import time

    kernels = Path(tempfile.mkdtemp(prefix="moe-course-kernel-"))
    spec = kernels / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps(
        {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "Python 3", "language": "python"}))
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(kernels)] + [
        p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p])
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["TQDM_DISABLE"] = "1"
    failed = 0
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        t0 = time.perf_counter()
        client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(p.parent)}})
        try:
            client.execute()
        except Exception as exc:  # noqa: BLE001 - report and go on with the next notebook
            failed += 1
            last = (str(exc).strip().splitlines() or [""])[-1][:300]  # a dead kernel has no message
            print(f"FAILED {p}: {type(exc).__name__}: {last}", flush=True)
            continue
        nb.metadata.get("kernelspec", {})["display_name"] = "Python 3"
        nbformat.write(nb, p)
        print(f"executed {p} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failed else 0


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


def _cmd_doctor(args: argparse.Namespace) -> int:
    from moe_course import doctor

    print(f"moe-course   {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"platform     {platform.platform()}")
    for name, version in doctor.environment_summary().items():
        print(f"{name:<12} {version}")
    try:
        from moe_course.device import default_preset, get_device

        device = get_device()
        print(f"device       {device} (preset: {default_preset(device)})")
    except Exception as err:  # torch may be missing or broken: check_torch says how to fix it
        print(f"device       unavailable ({type(err).__name__}: {err})")

    try:
        zoo = importlib.import_module("moe_course.zoo")
        where = zoo.cache_dir()
    except Exception:
        zoo, where = None, cache_dir()
    findings = doctor.run_checks(where)
    for finding in findings:
        print(f"{finding.name:<12} {'ok' if finding.ok else 'PROBLEM'}: {finding.detail}")
        if not finding.ok and finding.fix:
            print(f"{'':<12} fix: {finding.fix}")
    if zoo is not None:
        for name in getattr(zoo, "NAMES", None) or DEFAULT_ZOO_MODELS:
            try:
                state = "cached" if zoo.is_cached(name, "auto") else "not cached (trains on first use)"
            except Exception as err:
                state = f"unknown ({type(err).__name__}: {err})"
            print(f"zoo          {name}: {state}")
    problems = [f.name for f in findings if not f.ok]
    if problems:
        print(f"\n{len(problems)} problem(s): {', '.join(problems)}; run the fix shown under each")
        return 1
    print("\nno problems found")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    if text.strip() == "0":
        return 0.0
    return _positive_float(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} must be a directory, got file {str(out)!r}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option}: cannot create {str(out)!r} ({err.strerror or err})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"{option}: directory {str(out)!r} is not writable")
    return out


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_table(rows: Sequence[dict]) -> str:
    """The compression table as aligned text: technique, steps, size, ratio, quality, latency."""
    if not rows:
        return "(no rows)"
    metric = rows[0].get("metric", "quality")
    better = "higher" if rows[0].get("higher_is_better", True) else "lower"
    header = ("technique", "steps", "size", "ratio", f"{metric} ({better} is better)", "latency ms")
    body = [(
        str(r.get("technique", "")),
        str(r.get("steps", "")),
        _format_bytes(float(r.get("bytes", 0))),
        f"{float(r.get('ratio', float('nan'))):.2f}x",
        f"{float(r.get('quality', float('nan'))):.4g}",
        f"{float(r.get('latency_ms', float('nan'))):.2f}",
    ) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    right = {2, 3, 4, 5}

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _table_engine():
    """``(compression_table, plot_frontier)``, imported only when the command runs (torch, zoo)."""
    table = importlib.import_module("moe_course.course_table").compression_table
    return table, importlib.import_module("moe_course.viz").plot_frontier


def _cmd_table(args: argparse.Namespace) -> int:
    if args.model not in TABLE_MODELS:
        raise UsageError(f"--model must be one of {', '.join(TABLE_MODELS)}; got {args.model!r}")
    out = _output_dir(args.out)
    try:
        compression_table, plot_frontier = _table_engine()
    except (ImportError, AttributeError) as err:
        raise UsageError(f"the compression engine is not available ({type(err).__name__}: {err})") from None
    what = f"{args.model}{' (quick)' if args.quick else ''}"
    print(f"measuring the compression table of {what} ...", file=sys.stderr, flush=True)
    try:
        rows = compression_table(args.model, preset=args.preset, cache_dir=args.cache_dir, quick=args.quick)
    except ValueError as err:  # a bad --preset or --cache-dir, named by the engine
        raise UsageError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - one line, exit 1; the traceback helps nobody here
        print(f"moe-course table: error: the measurement failed ({type(err).__name__}: {err})", file=sys.stderr)
        return 1
    rows = [dict(r) for r in rows]
    print(format_table(rows))
    stem = f"compression_{args.model}{'_quick' if args.quick else ''}"
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    import csv

    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_frontier(rows, x=args.x)
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {csv_path}")
    print(f"wrote {png_path}")
    return 0


def _default_reference(paths: Sequence[str]) -> tuple[Path | None, str]:
    """The ``solutions/`` of the course checkout that holds the graded notebooks (searched upwards
    from each path), else of the checkout around the current directory; never another checkout's
    through the installed package."""
    for given in paths:
        here = Path(given).resolve()
        for candidate in (here, *here.parents):
            solutions = candidate / "solutions"
            if solutions.is_dir() and any(solutions.glob("*.ipynb")):
                return solutions, f"the solutions/ next to {given}"
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if _is_repo_root(candidate) and (candidate / "solutions").is_dir():
            return candidate / "solutions", "the solutions/ of the checkout around the current directory"
    return None, ""


def _cmd_grade(args: argparse.Namespace) -> int:
    from moe_course.grading import runner

    for path in args.paths:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"no such file or directory: {path!r}")
        if p.is_file() and p.suffix != ".ipynb":
            raise UsageError(f"expected .ipynb notebooks or directories, got {path!r}")
    if args.reference is not None:
        reference = Path(args.reference)
        if not reference.is_dir():
            raise UsageError(f"--reference must be a directory of reference notebooks, got {args.reference!r}")
        how = "--reference"
    else:
        reference, how = _default_reference(args.paths)
        if reference is None:
            print("note: no solutions/ found (pass --reference DIR): the exercises expected in each notebook "
                  "are the check calls it still contains, so deleted check cells go unnoticed", file=sys.stderr)
    if reference is not None:
        print(f"reference notebooks: {reference} ({how})")
    roster = None
    if args.roster is not None:
        if not Path(args.roster).is_file():
            raise UsageError(f"--roster must be a text file with one student id per line, got {args.roster!r}")
        roster = runner.read_roster(args.roster)
    notebooks = [n.strip().removesuffix(".ipynb") for n in args.notebooks.split(",")] if args.notebooks else None
    out = _output_dir(args.out)
    try:
        importlib.import_module("nbformat")
        importlib.import_module("nbclient")
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        KernelSpecManager().get_kernel_spec(runner.KERNEL_NAME)
    except ImportError as err:
        raise UsageError(f"grading needs nbclient, nbformat and ipykernel ({err}): pip install nbclient nbformat "
                         "ipykernel") from None
    except NoSuchKernel:
        raise UsageError(f"no Jupyter kernel named {runner.KERNEL_NAME!r}: python -m ipykernel install --user") from None
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        report = runner.grade(
            args.paths, reference_dir=reference, out_dir=out, timeout=args.timeout, cell_timeout=args.cell_timeout,
            check_timeout=args.check_timeout, max_output_bytes=args.max_output_bytes, jobs=args.jobs,
            roster=roster, notebooks=notebooks, progress=progress,
        )
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    students = len(report.per_student())
    missing = sum(run.outcome == runner.MISSING for run in report.runs)
    print(f"graded {len(report.runs) - missing} notebook(s) of {students} student(s) in {report.seconds:.1f} s"
          + (f"; {missing} expected notebook(s) not handed in" if missing else ""))
    print(runner.format_summary(report))
    print(f"wrote {out / 'grades.csv'}, {out / 'summary.csv'}, {out / 'grades.json'} and {out / 'executed'}/")
    return 0 if report.all_passed else 1


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="moe-course",
        description="Tools for the moe-course book, exercises, compression table, grading and environment.",
        epilog=EXIT_CODES.format(extra0="", extra1="the command ran and found a problem (see each command's --help)"),
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"moe-course {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    book = sub.add_parser(
        "book",
        help="build the website into book/_build/html",
        description="Build the Jupyter Book from the notebooks' stored outputs (nothing is executed).",
        epilog=EXIT_CODES.format(extra0="", extra1="jupyter-book failed (its exit code is passed on)"),
        formatter_class=fmt,
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
        epilog=EXIT_CODES.format(extra0="", extra1="--check: exercises/ is out of date; or unbalanced markers"),
        formatter_class=fmt,
    )
    ex.add_argument("--check", action="store_true", help="write nothing; exit 1 if exercises/ is stale")
    ex.add_argument("--solutions", metavar="DIR", help="source notebooks (default: <repo>/solutions)")
    ex.add_argument("--exercises", metavar="DIR", help="output directory (default: <repo>/exercises)")
    ex.set_defaults(func=_cmd_exercises)

    doctor = sub.add_parser(
        "doctor",
        help="check the environment: versions, device, kernel, cache, corpus; print fixes",
        description="Print what the course will run on (versions, device, preset, cache, zoo models) and check "
                    "for the problems that break it: a hijacked codec registry, torch missing or too old, no "
                    "python3 Jupyter kernel for this environment, an unwritable cache, a damaged corpus. "
                    "Each problem comes with the command that fixes it.",
        epilog=EXIT_CODES.format(extra0=": no problem found", extra1="a problem was found (its fix is printed)"),
        formatter_class=fmt,
    )
    doctor.set_defaults(func=_cmd_doctor)

    table = sub.add_parser(
        "table",
        help="measure and print the compression comparison of a zoo model",
        description="Compress a zoo model with every technique and the best combinations, measure size, "
                    "quality and latency, print the table and write it as CSV plus a PNG of the quality/size "
                    "frontier: OUT/compression_<model>[_quick].csv and .png. Trains the zoo model on first use.",
        epilog=EXIT_CODES.format(extra0="", extra1="the measurement failed (one line on stderr)"),
        formatter_class=fmt,
    )
    table.add_argument("--model", required=True, metavar="NAME",
                       help=f"the zoo model: {' or '.join(TABLE_MODELS)}")
    table.add_argument("--quick", action="store_true", help="fewer variants and a smaller evaluation set")
    table.add_argument("--out", default=".", metavar="DIR", help="where the CSV and PNG go (default: .)")
    table.add_argument("--preset", default=None, metavar="NAME",
                       help="zoo preset: cpu, gpu, test or auto (default: auto, by device)")
    table.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="zoo cache (default: $MOE_COURSE_CACHE, else ~/.cache/moe_course)")
    table.add_argument("--x", default="bytes", choices=("bytes", "latency_ms"),
                       help="x axis of the frontier plot (default: bytes)")
    table.set_defaults(func=_cmd_table)

    execute = sub.add_parser(
        "execute",
        help="re-execute notebooks in place (chapters, solutions), keeping their figures",
        description="Execute each notebook top to bottom in a fresh python3 kernel of this interpreter and "
                    "write it back with its outputs, figures included (matplotlib's inline backend is forced).",
        epilog=EXIT_CODES.format(extra0="", extra1="a notebook failed (it is left unchanged)"),
        formatter_class=fmt,
    )
    execute.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help=".ipynb files")
    execute.add_argument("--timeout", type=int, default=900, metavar="S", help="seconds per cell (default: 900)")
    execute.set_defaults(func=_cmd_execute)

    grade = sub.add_parser(
        "grade",
        help="execute students' exercise notebooks and collect their check results",
        description="""Execute each notebook in a fresh python3 kernel and collect what its check cells report.

PATH: .ipynb files or directories (searched recursively, hidden directories skipped).
Student id: the first sub-directory under a given directory (subm/alice/02_x.ipynb -> alice);
for a notebook directly in a given directory or given as a file, the part of its name before
the reference name (alice_02_sparse_gating.ipynb -> alice), else its parent directory's name.
Expected exercises: the check calls in the reference notebook of the same name (--reference).
Missing work: every student (and every --roster name) gets a 'missing' row per expected exercise of
each expected notebook (--notebooks, else every one anybody handed in) that they did not hand in.
Statuses: pass, fail, error, not implemented, timed out (the check's time limit), missing
(check cell deleted, or notebook not handed in), not run: cell error | timeout | kernel died, unreadable (not a notebook).
Writes OUT/grades.csv (student x exercise rows), OUT/summary.csv (one line per student),
OUT/grades.json and OUT/executed/<student>/*.ipynb; prints pass counts per student and exercise.
Student code runs with your permissions: grade untrusted submissions in a container.""",
        epilog=EXIT_CODES.format(extra0=": every expected exercise of every notebook passed",
                                 extra1="graded, but some exercise did not pass (see OUT/grades.csv)"),
        formatter_class=fmt,
    )
    grade.add_argument("paths", nargs="+", metavar="PATH", help="notebooks or directories of notebooks")
    grade.add_argument("--out", default="grades", metavar="DIR", help="report directory (default: ./grades)")
    grade.add_argument("--reference", default=None, metavar="DIR",
                       help="reference notebooks, matched by file name (default: the solutions/ of the "
                            "checkout holding the graded notebooks, else of the current directory's)")
    grade.add_argument("--timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                       help="time limit of one whole notebook (default: 600)")
    grade.add_argument("--cell-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                       help="time limit of one cell; past it the notebook stops (default: 300)")
    grade.add_argument("--check-timeout", type=_non_negative_float, default=60.0, metavar="SECONDS",
                       help="time limit of one check call, reported as 'timed out' (default: 60; 0: none)")
    grade.add_argument("--max-output-bytes", type=_positive_int, default=100_000, metavar="N",
                       help="output kept per cell; the rest is dropped (default: 100000)")
    grade.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                       help="notebooks graded at once, one kernel each (default: 1)")
    grade.add_argument("--roster", metavar="FILE",
                       help="student ids, one per line: students who handed in nothing get 'missing' rows")
    grade.add_argument("--notebooks", metavar="NAMES",
                       help="comma-separated reference notebooks every student must hand in, e.g. "
                            "02_sparse_gating,05_quantization (default: every one that anybody handed in)")
    grade.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    grade.set_defaults(func=_cmd_grade)
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
