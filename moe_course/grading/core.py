"""The checker machinery behind every exercise's check cell (the exercises of chapters 1 to 11).

A checker takes the student's function, runs it against the package's reference on fixed,
random and edge-case inputs, and returns a :class:`CheckResult` (also printed, so the check
cell shows a clear pass or a specific hint). A checker **never raises** (only ``KeyboardInterrupt``
goes through, so the stop button still works); whatever the student's code does is reported:

==================================  =====================  ==========================================
the student's code ...              status                 message
==================================  =====================  ==========================================
is the unchanged stub               ``not implemented``    "not implemented yet ..."
raises                              ``error``              names the exception and the line
imports a module that is missing    ``error``              names the module
calls ``exit()``                    ``error``              "your code called exit() ..."
returns ``None``                    ``fail``               "did you forget a ``return``?"
returns something the checker       ``fail``               what it returned (type, shape) and why it
cannot use (wrong type)                                    could not be used
modifies its input tensors          ``fail``               "your function modified its input ``x``"
loops forever / is too slow         ``timed out``          the time limit
prints megabytes                    (unchanged)            output kept to a head, the rest counted
==================================  =====================  ==========================================

Time limit: each check runs under a per-check limit (``timeout=`` argument of the check,
else ``$MOE_COURSE_CHECK_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT`). It is enforced with
``signal.setitimer``/``SIGALRM``, which only works in the main thread on POSIX (a Jupyter kernel runs
cells there). Elsewhere (Windows, a worker thread) the check runs without a limit; ``moe-course
grade`` still bounds every cell and notebook with its own timeouts. The alarm re-fires every
0.25 s until the check returns, so a bare ``except:`` in student code cannot swallow it for good
(only code that catches ``BaseException`` inside an endless loop escapes it: the cell timeout of
``moe-course grade`` stops that).

Output: what the student's code prints (stdout and stderr) during a check is captured; the first
``$MOE_COURSE_CHECK_MAX_OUTPUT`` characters (default :data:`DEFAULT_MAX_OUTPUT`) are shown before the
result, the rest is counted, never stored.

Grade log: when ``$MOE_COURSE_GRADE_LOG`` names a file, every result is also appended to it as one
JSON line (``check_id``, ``name``, ``status``, ``message``, ``seconds``); ``moe-course grade`` reads
it (see :mod:`moe_course.grading.runner`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

PASS, FAIL, NOT_IMPLEMENTED, ERROR, TIMEOUT = "pass", "fail", "not implemented", "error", "timed out"
STATUSES = (PASS, FAIL, NOT_IMPLEMENTED, ERROR, TIMEOUT)

GRADE_LOG_ENV = "MOE_COURSE_GRADE_LOG"
TIMEOUT_ENV = "MOE_COURSE_CHECK_TIMEOUT"
MAX_OUTPUT_ENV = "MOE_COURSE_CHECK_MAX_OUTPUT"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT = 4000
MAX_MESSAGE = 600  # characters of a message (an exception's text can be megabytes)
_MAX_SNAPSHOT_ELEMENTS = 50_000_000  # inputs larger than this are not copied for the mutation check


class CheckFailed(AssertionError):
    """Raised inside a checker with the hint a student should read."""


class _CheckTimeout(BaseException):
    """Raised by the alarm; a BaseException so that ``except Exception`` in student code cannot catch it."""


@dataclass
class CheckResult:
    name: str
    status: str
    message: str
    check_id: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __str__(self) -> str:
        mark = {PASS: "PASS", FAIL: "FAIL", NOT_IMPLEMENTED: "TODO", ERROR: "ERROR", TIMEOUT: "TIMEOUT"}
        return f"[{mark.get(self.status, self.status.upper())}] {self.name}: {self.message}"

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return asdict(self)

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
        raise CheckFailed(f"expected a torch.Tensor, got {describe(actual)}. {hint}")
    actual_cpu = actual.detach().float().cpu()
    expected_cpu = torch.as_tensor(expected).detach().float().cpu()
    if actual_cpu.shape != expected_cpu.shape:
        raise CheckFailed(f"shape {tuple(actual_cpu.shape)} but expected {tuple(expected_cpu.shape)}. {hint}")
    if not torch.allclose(actual_cpu, expected_cpu, rtol=rtol, atol=atol, equal_nan=False):
        gap = (actual_cpu - expected_cpu).abs().max().item()
        raise CheckFailed(f"values differ from the reference (max |diff| = {gap:.3g}). {hint}")


class LargestIntermediate(TorchFunctionMode):
    """Records the largest tensor (in elements) any torch function returns while active: the
    check that a factorized forward never materialises the expert weight tensor."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


def describe(value: Any) -> str:
    """A short description of a value for a hint: ``a tensor of shape (3, 4) and dtype float32``."""
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} and dtype {str(value.dtype).replace('torch.', '')}"
    if value is None:
        return "None"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) if torch.is_tensor(v) else type(v).__name__ for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"a {type(value).__name__} of {len(value)} item(s) ({inner}{more})"
    module = type(value).__module__
    qual = type(value).__name__ if module in ("builtins", None) else f"{module.split('.')[0]}.{type(value).__name__}"
    shape = getattr(value, "shape", None)
    return f"a {qual}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def _short(text: str, limit: int = MAX_MESSAGE) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 30] + f" ... [{len(text) - limit + 30} more characters]"


# ------------------------------------------------------------------------------------ time limit
def check_timeout(timeout: float | None = None) -> float | None:
    """The per-check time limit in seconds: ``timeout``, else ``$MOE_COURSE_CHECK_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT`; ``0`` or a negative value means no limit (returns None)."""
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout = float(raw) if raw.strip() else DEFAULT_TIMEOUT
        except ValueError:
            timeout = DEFAULT_TIMEOUT
    return None if timeout is None or timeout <= 0 or math.isinf(timeout) else float(timeout)


def can_time_limit() -> bool:
    """True where the per-check time limit can interrupt Python code: POSIX, main thread."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


class _TimeLimit:
    """Raise :class:`_CheckTimeout` in the main thread ``seconds`` after :meth:`arm` (re-firing every
    0.25 s until :meth:`disarm`); a no-op where :func:`can_time_limit` is False."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds if seconds is not None and can_time_limit() else None
        self.active = False

    def _on_alarm(self, signum, frame) -> None:
        if self.active:
            raise _CheckTimeout()

    def arm(self) -> None:
        if self.seconds is None:
            return
        self.start = time.monotonic()
        self.old_timer = signal.getitimer(signal.ITIMER_REAL)
        limit = self.seconds
        if self.old_timer[0] > 0:  # an outer alarm (pytest-timeout, a nested check) is due first
            limit = min(limit, self.old_timer[0])
        self.old_handler = signal.signal(signal.SIGALRM, self._on_alarm)
        self.active = True
        signal.setitimer(signal.ITIMER_REAL, limit, 0.25)

    def disarm(self) -> None:
        """Stop the alarm and restore any outer one; safe against an alarm arriving meanwhile."""
        if self.seconds is None or not hasattr(self, "old_handler") or getattr(self, "disarmed", False):
            return
        while True:
            try:
                self.active = False  # from here on the handler does nothing
                signal.setitimer(signal.ITIMER_REAL, 0, 0)
                self.disarmed = True
                break
            except _CheckTimeout:
                continue
        signal.signal(signal.SIGALRM, self.old_handler if self.old_handler is not None else signal.SIG_DFL)
        remaining, interval = self.old_timer
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.monotonic() - self.start), 1e-3), interval)


# ------------------------------------------------------------------------------------ output cap
class _CappedText(io.TextIOBase):
    """A text stream that keeps the first ``limit`` characters and only counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit, self.head, self.total = limit, [], 0

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        text = str(text)
        kept = sum(len(h) for h in self.head)
        if kept < self.limit:
            self.head.append(text[: self.limit - kept])
        self.total += len(text)
        return len(text)

    def report(self) -> str:
        head = "".join(self.head)
        if self.total > len(head):
            head += (f"{'' if head.endswith(chr(10)) else chr(10)}... [{self.total - len(head)} more characters "
                     "of your output were hidden]\n")
        return head


def _max_output() -> int:
    try:
        return max(0, int(os.environ.get(MAX_OUTPUT_ENV, DEFAULT_MAX_OUTPUT)))
    except ValueError:
        return DEFAULT_MAX_OUTPUT


# ------------------------------------------------------------------------------------ the guard
_NOTHING = object()


def _walk(value: Any, path: str, out: list, depth: int = 0) -> None:
    """Collect ``(path, tensor)`` for every tensor reachable in an argument (containers, modules)."""
    if torch.is_tensor(value):
        out.append((path, value))
    elif isinstance(value, torch.nn.Module):
        for key, tensor in value.state_dict(keep_vars=True).items():
            if torch.is_tensor(tensor):
                out.append((f"{path}.{key}", tensor))
    elif depth < 3 and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", out, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for k, v in list(value.items())[:100]:
            _walk(v, f"{path}[{k!r}]", out, depth + 1)


def _argument_names(fn: Callable, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        return list(bound.arguments.items())
    except (TypeError, ValueError):
        return [(f"argument {i + 1}", a) for i, a in enumerate(args)] + list(kwargs.items())


def _resolve(target: str) -> tuple[Any, str, Any]:
    """``"moe_course.dispatch.capacity_mask"`` -> (owner object, attribute name, the object itself);
    the owner is a module or a class (``"moe_course.layers.SparseMoE.capacity"``)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1], getattr(owner, parts[-1])
    raise ImportError(target)


class _Forbidden:
    """While active, the package functions in ``targets`` raise :class:`CheckFailed` when called: in
    their modules (and classes), in every ``moe_course`` module that imported them, and in the
    student's own globals (``from moe_course.dispatch import capacity_mask`` in a notebook)."""

    def __init__(self, fn: Callable, targets: tuple[str, ...]) -> None:
        self.fn, self.targets, self.undo = fn, targets, []
        self.originals: dict[int, Any] = {}  # id(stub) -> the function it stands for

    def _stub(self, target: str) -> Callable:
        label = target.split("moe_course.", 1)[-1]

        def forbidden(*args, **kwargs):
            raise CheckFailed(f"your function calls the package's own `{label}`: the exercise asks you to write "
                              "it yourself, in plain PyTorch (the rule stated at the top of the notebook)")
        return forbidden

    def _swap(self, space: Any, key: str, value: Any, is_dict: bool) -> None:
        old = space[key] if is_dict else getattr(space, key)
        self.undo.append((space, key, old, is_dict))
        if is_dict:
            space[key] = value
        else:
            setattr(space, key, value)

    def __enter__(self) -> "_Forbidden":
        user = getattr(getattr(self.fn, "__wrapped__", self.fn), "__globals__", None)
        for target in self.targets:
            try:
                owner, attr, original = _resolve(target)
            except (ImportError, AttributeError):
                continue
            stub = self._stub(target)
            self.originals[id(stub)] = (stub, original)
            self._swap(owner, attr, stub, False)
            for name, module in list(sys.modules.items()):
                if module is None or not (name == "moe_course" or name.startswith("moe_course.")) or module is owner:
                    continue
                for key, value in list(vars(module).items()):
                    if value is original:
                        self._swap(module, key, stub, False)
            if isinstance(user, dict):
                for key, value in list(user.items()):
                    if value is original:
                        self._swap(user, key, stub, True)
        return self

    def __exit__(self, *exc) -> None:
        for space, key, old, is_dict in reversed(self.undo):
            if is_dict:
                space[key] = old
            else:
                setattr(space, key, old)
        self.undo.clear()
        # a package module first imported while the stubs were in place bound a stub: give it the original
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "moe_course" or name.startswith("moe_course.")):
                continue
            for key, value in list(vars(module).items()):
                entry = self.originals.get(id(value))
                if entry is not None and entry[0] is value:
                    setattr(module, key, entry[1])
        self.originals.clear()


class _Guard:
    """Wraps the student's function: records what it returned or raised and catches in-place edits
    of its tensor inputs (compared element by element before and after each call); package functions
    the exercise forbids raise while it runs."""

    def __init__(self, fn: Callable, allow_none: bool, check_mutation: bool, forbid: tuple[str, ...] = ()) -> None:
        self.fn, self.allow_none, self.check_mutation, self.forbid = fn, allow_none, check_mutation, tuple(forbid)
        self.calls, self.last_return, self.raised = 0, _NOTHING, None

    def __call__(self, *args, **kwargs):
        snapshot = self._snapshot(args, kwargs) if self.check_mutation else []
        self.calls += 1
        try:
            with _Forbidden(self.fn, self.forbid):
                out = self.fn(*args, **kwargs)
        except BaseException as exc:
            self.raised = exc
            raise
        self.last_return = out
        for name, tensor, before in snapshot:
            if _changed(tensor, before):
                raise CheckFailed(
                    f"your function modified its input `{name}` in place (with `+=`, `.add_()`, `x[...] = ...` "
                    "or similar); the caller still needs it unchanged: work on a copy (`x = x.clone()`) or use "
                    "out-of-place operations (`x = x + 1`)")
        if out is None and not self.allow_none:
            raise CheckFailed("your function returned None: did you forget a `return` statement?")
        return out

    def _snapshot(self, args: tuple, kwargs: dict) -> list:
        found: list = []
        for name, value in _argument_names(self.fn, args, kwargs):
            _walk(value, name, found)
        if sum(t.numel() for _, t in found) > _MAX_SNAPSHOT_ELEMENTS:
            return []
        with torch.no_grad():
            return [(name, t, (tuple(t.shape), t.detach().clone())) for name, t in found]


def _changed(tensor: torch.Tensor, before: tuple) -> bool:
    shape, copy = before
    if tuple(tensor.shape) != shape:
        return True
    now = tensor.detach()
    if now.is_floating_point() or now.is_complex():
        return not torch.equal(torch.isnan(now), torch.isnan(copy)) or not torch.equal(
            torch.nan_to_num(now), torch.nan_to_num(copy))
    return not torch.equal(now, copy)


def _student_line(exc: BaseException, fn: Callable) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    code = getattr(getattr(fn, "__wrapped__", fn), "__code__", None)
    mine = [f for f in frames if code is not None and f.filename == code.co_filename]
    frame = (mine or frames or [None])[-1]
    return f" (line {frame.lineno})" if frame is not None and frame.lineno else ""


# ------------------------------------------------------------------------------------ checker
def checker(name: str, *, allow_none: bool = False, check_mutation: bool = True,
            forbid: tuple[str, ...] = (), timeout: float | None = None) -> Callable:
    """Turn ``body(student_fn)`` (which raises :class:`CheckFailed`) into a friendly checker.

    The returned ``check(student_fn, *, quiet=False, timeout=None)`` never raises. ``allow_none``
    accepts ``None`` as a return value; ``check_mutation=False`` allows in-place edits of inputs
    (for exercises whose point is to modify something in place). ``forbid`` names package functions
    (``"moe_course.dispatch.capacity_mask"``, ``"moe_course.layers.SparseMoE.capacity"``) the exercise
    asks the student to write themselves: calling one while the student's function runs fails the
    check with a hint saying so. ``timeout`` raises the default time limit for a check that runs a
    model (an explicit ``timeout=`` of the call still wins).
    """

    min_timeout = timeout

    def decorate(body: Callable) -> Callable:
        check_id = f"{body.__module__.rsplit('.', 1)[-1]}.{body.__name__}"

        @functools.wraps(body)
        def run(student_fn: Callable, *, quiet: bool = False, timeout: float | None = None) -> CheckResult:
            captured = _CappedText(_max_output())
            start = time.perf_counter()
            limit = check_timeout(timeout)
            if timeout is None and limit is not None and min_timeout is not None:
                limit = max(limit, float(min_timeout))
            result = _run(name, body, student_fn, limit, captured, allow_none, check_mutation, tuple(forbid))
            result.check_id, result.seconds = check_id, round(time.perf_counter() - start, 4)
            result.message = _short(result.message)
            if not quiet:
                text = captured.report()
                if text:
                    print(text, end="" if text.endswith("\n") else "\n")
                print(result)
            _log(result)
            return result

        run.check_name = name
        run.check_id = check_id
        return run

    return decorate


def _run(name: str, body: Callable, student_fn: Callable, timeout: float | None, captured: _CappedText,
         allow_none: bool, check_mutation: bool, forbid: tuple[str, ...] = ()) -> CheckResult:
    if not callable(student_fn):
        return CheckResult(name, ERROR, f"expected your function, got {describe(student_fn)}: pass the function "
                                        "itself (no parentheses after its name)")
    guard = _Guard(student_fn, allow_none, check_mutation, forbid)
    try:
        functools.update_wrapper(guard, student_fn, updated=())  # name and doc only, not the attributes
    except (AttributeError, TypeError):
        pass
    stdout, stderr = sys.stdout, sys.stderr
    limit = _TimeLimit(timeout)
    try:
        try:
            limit.arm()
            sys.stdout = sys.stderr = captured
            with torch.random.fork_rng():  # checks draw random inputs without disturbing the notebook
                torch.manual_seed(0)
                body(guard)
        finally:
            limit.disarm()
            sys.stdout, sys.stderr = stdout, stderr
    except _CheckTimeout:
        limit.disarm()  # idempotent; again in case the alarm hit the finally block before its disarm
        sys.stdout, sys.stderr = stdout, stderr
        return CheckResult(name, TIMEOUT, f"timed out after {timeout:g} s: your code is too slow or never "
                                          "finishes (an endless loop? a `while` whose condition never changes?)")
    except KeyboardInterrupt:
        raise
    except NotImplementedError:
        return CheckResult(name, NOT_IMPLEMENTED, "not implemented yet: replace the `raise NotImplementedError` line")
    except CheckFailed as exc:
        return CheckResult(name, FAIL, str(exc))
    except ModuleNotFoundError as exc:
        return CheckResult(name, ERROR, f"your code imports `{exc.name}`, which is not installed here: use torch "
                                        "and the course package only (or install it, e.g. `pip install "
                                        f"{(exc.name or '').split('.')[0]}`)")
    except SystemExit:
        return CheckResult(name, ERROR, "your code called exit() / sys.exit(): return the result instead")
    except BaseException as exc:  # noqa: BLE001 - a checker never raises
        if guard.raised is not None and (exc is guard.raised or _caused_by(exc, guard.raised)):
            return CheckResult(name, ERROR, f"your code raised {type(exc).__name__}: {_short(exc, 300)}"
                                            f"{_student_line(exc, student_fn)}")
        if guard.last_return is not _NOTHING:
            return CheckResult(name, FAIL, f"the checker could not use what your function returned "
                                           f"({describe(guard.last_return)}): {type(exc).__name__}: "
                                           f"{_short(exc, 200)}. Check the return type and shape the exercise asks for")
        return CheckResult(name, ERROR, f"the checker itself failed ({type(exc).__name__}: {_short(exc, 200)}); "
                                        "this is a bug in the course, please report it")
    return CheckResult(name, PASS, "all checks passed")


def _caused_by(exc: BaseException, cause: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if exc is cause:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _log(result: CheckResult) -> None:
    """Append ``result`` as a JSON line to ``$MOE_COURSE_GRADE_LOG`` (if set); never raises."""
    path = os.environ.get(GRADE_LOG_ENV)
    if not path:
        return
    line = json.dumps({**result.to_dict(), "time": time.time()}, ensure_ascii=True) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as err:
        print(f"(could not append to the grade log {path}: {err})", file=sys.__stderr__)
