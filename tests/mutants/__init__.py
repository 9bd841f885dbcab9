"""Plausible wrong answers ("mutants") and correct alternatives for every exercise.

Each chapter module (``ch01``, ``ch02``, ...) registers functions with :func:`wrong` (a mistake a
student would make, with the words the grader's hint must contain) or :func:`right` (a correct
solution written differently from the one in ``solutions/``). ``tests/test_grader_mutations.py``
runs every registered function through its exercise's checker: mutants must be rejected with a
hint that names the mistake, alternatives (and the solution notebook's own code) must pass.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pathlib import Path

# one mutant module per chapter that has a grader (moe_course/grading/chNN.py)
CHAPTERS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "moe_course" / "grading").glob("ch[0-9][0-9].py"))


@dataclass(frozen=True)
class Entry:
    check_id: str  # "ch02.check_topk_route"
    fn: Callable
    hint: tuple[str, ...] = ()  # words the grader's message must contain (case-insensitive), for a mutant

    @property
    def id(self) -> str:
        return f"{self.check_id}-{self.fn.__name__}"

    @property
    def what(self) -> str:
        return (self.fn.__doc__ or self.fn.__name__).strip()


WRONG: list[Entry] = []
RIGHT: list[Entry] = []


class Chapter:
    """``M = Chapter("ch02")``, then ``@M.wrong("check_topk_route", "not renormalised")`` or
    ``@M.right("check_topk_route")`` above a function."""

    def __init__(self, chapter: str) -> None:
        self.chapter = chapter

    def wrong(self, check: str, *hint: str) -> Callable:
        def register(fn: Callable) -> Callable:
            assert hint, f"{fn.__name__}: a mutant needs the words its hint must contain"
            WRONG.append(Entry(f"{self.chapter}.{check}", fn, tuple(hint)))
            return fn
        return register

    def right(self, check: str) -> Callable:
        def register(fn: Callable) -> Callable:
            RIGHT.append(Entry(f"{self.chapter}.{check}", fn))
            return fn
        return register


def load_all() -> tuple[list[Entry], list[Entry]]:
    for chapter in CHAPTERS:
        importlib.import_module(f"{__name__}.{chapter}")
    return WRONG, RIGHT
