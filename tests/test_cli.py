"""The `moe-course` command line (moe_course.cli)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import types
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from moe_course import __version__, cli


def _solutions(tmp_path: Path) -> tuple[Path, Path]:
    nb = new_notebook()
    nb.cells = [
        new_markdown_cell("# Dense MoE"),
        new_code_cell("def gate(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"),
    ]
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    solutions.mkdir()
    nbformat.write(nb, solutions / "01_dense_moe.ipynb")
    return solutions, exercises


@pytest.mark.parametrize("command", [[], ["book"], ["exercises"], ["doctor"], ["table"], ["grade"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moe-course")
    assert "exit codes:" in out and "2  usage error" in out
    if command == ["exercises"]:
        assert "--check" in out
    if command == ["book"]:
        assert "--strict" in out
    if command == ["table"]:
        assert "--quick" in out and "shakespeare-moe or mnist1d-moe" in out
    if command == ["grade"]:
        for option in ("--out", "--timeout", "--cell-timeout", "--check-timeout", "--max-output-bytes", "--reference"):
            assert option in out
    if command == []:
        for name in ("book", "exercises", "doctor", "table", "grade"):
            assert name in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe-course {__version__}"


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: moe-course" in capsys.readouterr().err


def test_exercises_check_fails_when_stale_then_passes(tmp_path, capsys):
    solutions, exercises = _solutions(tmp_path)
    args = ["exercises", "--solutions", str(solutions), "--exercises", str(exercises)]

    assert cli.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert "01_dense_moe.ipynb" in err and "moe-course exercises" in err
    assert not exercises.exists()

    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert (exercises / "01_dense_moe.ipynb").is_file()
    assert cli.main([*args, "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_exercises_unbalanced_markers_exit_1(tmp_path, capsys):
    solutions, exercises = _solutions(tmp_path)
    nb = nbformat.read(solutions / "01_dense_moe.ipynb", as_version=4)
    nb.cells[1].source = "### BEGIN SOLUTION\nx = 1\n"
    nbformat.write(nb, solutions / "01_dense_moe.ipynb")
    code = cli.main(["exercises", "--solutions", str(solutions), "--exercises", str(exercises)])
    assert code == 1
    assert "never closed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["exercises", "--solutions", "{tmp}/missing", "--exercises", "{tmp}/ex"],
        ["exercises", "--check", "--solutions", "{tmp}/missing", "--exercises", "{tmp}/ex"],
        ["book", "--book-dir", "{tmp}/missing"],
        ["book", "--book-dir", "{tmp}"],  # exists, but is not a book
    ],
)
def test_bad_paths_exit_2_with_a_clear_message(tmp_path, capsys, argv):
    code = cli.main([a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path) in err


def test_exercises_refuses_a_file_as_output_dir(tmp_path, capsys):
    solutions, _ = _solutions(tmp_path)
    target = tmp_path / "not_a_dir"
    target.write_text("")
    assert cli.main(["exercises", "--solutions", str(solutions), "--exercises", str(target)]) == 2
    assert "--exercises must be a directory" in capsys.readouterr().err


def test_book_without_jupyter_book_asks_for_the_extra(tmp_path, without_module, capsys):
    book = tmp_path / "book"
    book.mkdir()
    (book / "_config.yml").write_text("title: t\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: index\n")
    without_module("jupyter_book")
    assert cli.main(["book", "--book-dir", str(book)]) == 2
    assert "[book] extra" in capsys.readouterr().err


def test_doctor_reports_versions_device_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path / "cache"))
    assert cli.main(["doctor"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    import torch

    assert f"moe-course   {__version__}" in out
    assert torch.__version__ in out
    assert "device" in out
    assert str(tmp_path / "cache") in out


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path))
    assert cli.cache_dir() == tmp_path
    monkeypatch.delenv("MOE_COURSE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cli.cache_dir() == Path.home() / ".cache" / "moe_course"


def test_find_book_dir_from_a_subdirectory(monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo / "tests")
    assert cli.find_book_dir() == repo / "book"


def test_console_script_is_installed():
    exe = shutil.which("moe-course")
    if exe is None:
        pytest.skip("moe-course console script not on PATH (package not pip-installed)")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"moe-course {__version__}"


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "moe_course.cli", "exercises", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--check" in done.stdout


def test_doctor_reports_cached_and_missing_zoo_models_and_the_kernel(monkeypatch, capsys):
    zoo = cli.importlib.import_module("moe_course.zoo")
    monkeypatch.setattr(zoo, "is_cached", lambda name, preset="auto", cache_dir=None: name == "mnist1d-moe")
    assert cli.main(["doctor"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "zoo          mnist1d-moe: cached" in out
    assert "zoo          shakespeare-moe: not cached (trains on first use)" in out
    assert "kernel       ok: python3" in out


def test_doctor_with_an_empty_cache_says_not_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path))
    assert cli.main(["doctor"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    from moe_course.cli import DEFAULT_ZOO_MODELS

    assert out.count(": not cached (trains on first use)") == len(DEFAULT_ZOO_MODELS)


# ------------------------------------------------------------------------------------- table
FAKE_ROWS = [
    {"technique": "baseline", "steps": "none", "bytes": 4_000_000, "ratio": 1.0, "quality": 0.91,
     "metric": "accuracy", "higher_is_better": True, "latency_ms": 2.5},
    {"technique": "int4", "steps": "quantize(bits=4)", "bytes": 600_000, "ratio": 6.67, "quality": 0.89,
     "metric": "accuracy", "higher_is_better": True, "latency_ms": 3.1},
]


@pytest.fixture
def fake_engine(monkeypatch):
    """Fakes of course_table.compression_table and viz.plot_frontier behind the CLI's lazy import."""
    import matplotlib

    matplotlib.use("Agg")
    calls = {}

    def compression_table(model_name, *, preset=None, cache_dir=None, quick=False):
        calls["table"] = (model_name, preset, cache_dir, quick)
        if preset == "bogus":
            raise ValueError(f"preset must be one of ('cpu', 'gpu', 'test', 'auto'), got {preset!r}")
        if preset == "explode":
            raise RuntimeError("out of memory")
        return [dict(r) for r in FAKE_ROWS]

    def plot_frontier(rows, x="bytes", ax=None):
        import matplotlib.pyplot as plt

        calls["plot"] = (len(rows), x)
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([r[x] for r in rows], [r["quality"] for r in rows], "o")
        return fig

    table = types.SimpleNamespace(compression_table=compression_table)
    viz = types.SimpleNamespace(plot_frontier=plot_frontier)
    real_import = cli.importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "moe_course.course_table":
            return table
        if name == "moe_course.viz":
            return viz
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    return calls, table


def test_table_prints_and_writes_csv_and_png(fake_engine, tmp_path, capsys):
    calls, _ = fake_engine
    code = cli.main(["table", "--model", "mnist1d-moe", "--quick", "--out", str(tmp_path / "t"), "--preset", "cpu",
                     "--x", "latency_ms"])
    assert code == 0
    assert calls["table"] == ("mnist1d-moe", "cpu", None, True)
    assert calls["plot"] == (2, "latency_ms")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["technique", "steps", "size", "ratio"] and "accuracy (higher is better)" in lines[0]
    assert "int4" in out and "6.67x" in out and "585.9 KiB" in out and "0.89" in out
    csv_path = tmp_path / "t" / "compression_mnist1d-moe_quick.csv"
    png_path = tmp_path / "t" / "compression_mnist1d-moe_quick.png"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["technique"] for r in rows] == ["baseline", "int4"] and rows[1]["bytes"] == "600000"
    assert list(rows[0]) == list(FAKE_ROWS[0])
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {csv_path}" in out and f"wrote {png_path}" in out


def test_table_unknown_model_exits_2_naming_the_allowed_names(fake_engine, tmp_path, capsys):
    calls, _ = fake_engine
    assert cli.main(["table", "--model", "gpt-moe", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shakespeare-moe" in err and "mnist1d-moe" in err and "'gpt-moe'" in err
    assert "table" not in calls  # rejected before anything is measured


def test_table_bad_preset_is_a_usage_error_and_a_failure_exit_1(fake_engine, tmp_path, capsys):
    assert cli.main(["table", "--model", "mnist1d-moe", "--preset", "bogus", "--out", str(tmp_path)]) == 2
    assert "moe-course table: error: preset must be one of" in capsys.readouterr().err
    assert cli.main(["table", "--model", "mnist1d-moe", "--preset", "explode", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: out of memory" in err and err.count("\n") == 2  # progress line + error line
    assert not list(tmp_path.glob("*.csv"))


def test_table_argument_validation(fake_engine, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["table"])  # --model is required
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["table", "--model", "mnist1d-moe", "--x", "flops"])
    assert exit_info.value.code == 2
    (tmp_path / "f").write_text("")
    assert cli.main(["table", "--model", "mnist1d-moe", "--out", str(tmp_path / "f")]) == 2
    assert "--out must be a directory" in capsys.readouterr().err


def test_table_without_the_engine_is_a_clear_usage_error(without_module, tmp_path, capsys):
    without_module("moe_course.course_table")
    assert cli.main(["table", "--model", "mnist1d-moe", "--out", str(tmp_path)]) == 2
    assert "compression engine is not available" in capsys.readouterr().err


def test_format_table_lower_is_better():
    rows = [dict(FAKE_ROWS[0], metric="perplexity", higher_is_better=False, quality=4.2)]
    text = cli.format_table(rows)
    assert "perplexity (lower is better)" in text and "3.8 MiB" in text and "1.00x" in text
    assert cli.format_table([]) == "(no rows)"


# ------------------------------------------------------------------------------------- doctor
def _doctor(capsys) -> tuple[int, str]:
    code = cli.main(["doctor"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out


def test_doctor_finds_an_unwritable_cache_and_says_the_fix(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MOE_COURSE_CACHE", str(blocker / "cache"))  # a path under a file
    code, out = _doctor(capsys)
    assert code == 1
    assert "cache        PROBLEM" in out and "export MOE_COURSE_CACHE=" in out


def test_doctor_finds_a_missing_or_foreign_kernel(tmp_path, monkeypatch, capsys):
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def missing(self, name):
        raise NoSuchKernel(name)

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", missing)
    code, out = _doctor(capsys)
    assert code == 1 and "no Jupyter kernel named python3" in out
    assert "-m ipykernel install --user --name python3" in out

    class Foreign:
        argv = ["/opt/some/other/python", "-m", "ipykernel_launcher"]

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", lambda self, name: Foreign())
    code, out = _doctor(capsys)
    assert code == 1 and "runs /opt/some/other/python, not this environment's" in out


def test_doctor_finds_an_old_torch(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.1.2+cpu")
    code, out = _doctor(capsys)
    assert code == 1
    assert "torch 2.1.2+cpu is older than 2.2" in out and 'pip install -c .ci/constraints.txt "torch>=2.2"' in out


def test_doctor_reports_a_failing_check_instead_of_a_traceback(monkeypatch, capsys):
    from moe_course import doctor

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "check_corpus", broken)
    code, out = _doctor(capsys)
    assert code == 1 and "the check failed (RuntimeError: boom)" in out
