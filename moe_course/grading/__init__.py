"""Exercise checkers, one module per chapter (``grading.ch01`` for chapter 1 ...), built on :mod:`.core`."""

from .core import CheckFailed, CheckResult, checker, expect, expect_close

__all__ = ["CheckFailed", "CheckResult", "checker", "expect", "expect_close"]
