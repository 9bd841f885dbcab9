"""The checker machinery behind every exercise's check cell.

A checker takes the student's function, runs it against the package's reference on fixed,
random and edge-case inputs, and returns a :class:`CheckResult` (also printed, so the check
cell shows a clear pass or a specific hint). It never raises: an unfinished exercise reports
"not implemented yet", and a crash inside the student's code becomes a hint naming the error.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

PASS, FAIL, NOT_IMPLEMENTED, ERROR = "pass", "fail", "not implemented", "error"


class CheckFailed(AssertionError):
    """Raised inside a checker with the hint a student should read."""


@dataclass
class CheckResult:
    name: str
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __str__(self) -> str:
        mark = {PASS: "PASS", FAIL: "FAIL", NOT_IMPLEMENTED: "TODO", ERROR: "ERROR"}[self.status]
        return f"[{mark}] {self.name}: {self.message}"

    def __bool__(self) -> bool:
        return self.passed

    def _ipython_display_(self) -> None:
        # The checker already printed the result; a notebook cell ending in the check shows it once.
        pass


def expect(condition: bool, hint: str) -> None:
    """Fail the check with ``hint`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(hint)


def expect_close(actual, expected, hint: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Compare tensors in float32 on CPU (device-independent), failing with ``hint`` and the gap."""
    if not torch.is_tensor(actual):
        raise CheckFailed(f"expected a torch.Tensor, got {type(actual).__name__}. {hint}")
    actual_cpu = actual.detach().float().cpu()
    expected_cpu = torch.as_tensor(expected).detach().float().cpu()
    if actual_cpu.shape != expected_cpu.shape:
        raise CheckFailed(f"shape {tuple(actual_cpu.shape)} but expected {tuple(expected_cpu.shape)}. {hint}")
    if not torch.allclose(actual_cpu, expected_cpu, rtol=rtol, atol=atol, equal_nan=False):
        gap = (actual_cpu - expected_cpu).abs().max().item()
        raise CheckFailed(f"values differ from the reference (max |diff| = {gap:.3g}). {hint}")


def checker(name: str) -> Callable:
    """Turn ``body(student_fn)`` (which raises :class:`CheckFailed`) into a friendly checker."""

    def decorate(body: Callable) -> Callable:
        @functools.wraps(body)
        def run(student_fn: Callable, *, quiet: bool = False) -> CheckResult:
            result = _run(name, body, student_fn)
            if not quiet:
                print(result)
            return result

        run.check_name = name
        return run

    return decorate


def _run(name: str, body: Callable, student_fn: Callable) -> CheckResult:
    if not callable(student_fn):
        return CheckResult(name, ERROR, f"expected your function, got {type(student_fn).__name__}")
    try:
        with torch.random.fork_rng():  # checks draw random inputs without disturbing the notebook
            torch.manual_seed(0)
            body(student_fn)
    except NotImplementedError:
        return CheckResult(name, NOT_IMPLEMENTED, "not implemented yet: replace the `raise NotImplementedError` line")
    except CheckFailed as exc:
        return CheckResult(name, FAIL, str(exc))
    except Exception as exc:  # the student's code crashed: say where, briefly
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return CheckResult(name, ERROR, f"your code raised {type(exc).__name__}: {exc} (line {where.lineno})")
    return CheckResult(name, PASS, "all checks passed")
