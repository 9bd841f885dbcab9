"""The `moe-course` command line (moe_course.cli)."""

from __future__ import annotations

import shutil
import subprocess
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


@pytest.mark.parametrize("command", [[], ["book"], ["exercises"], ["doctor"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moe-course")
    if command == ["exercises"]:
        assert "--check" in out
    if command == ["book"]:
        assert "--strict" in out


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


def test_book_without_jupyter_book_asks_for_the_extra(tmp_path, monkeypatch, capsys):
    book = tmp_path / "book"
    book.mkdir()
    (book / "_config.yml").write_text("title: t\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: index\n")
    real_import = cli.importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "jupyter_book":
            raise ImportError("no jupyter_book")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main(["book", "--book-dir", str(book)]) == 2
    assert "[book] extra" in capsys.readouterr().err


def test_doctor_reports_versions_device_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path / "cache"))
    assert cli.main(["doctor"]) == 0
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
