"""grading.core: a checker never raises, and names what went wrong with the student's code."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import pytest
import torch

from moe_course.grading import ch02
from moe_course.grading.core import (
    ERROR, FAIL, GRADE_LOG_ENV, NOT_IMPLEMENTED, PASS, TIMEOUT, CheckResult, can_time_limit, check_timeout,
    checker, describe, expect_close,
)


@checker("Exercise 0.1: double")
def check_double(fn) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    expect_close(fn(x), 2 * torch.arange(6.0).reshape(2, 3), "return 2 * x")


def double(x):
    return 2 * x


def run(fn, **kwargs):
    return check_double(fn, quiet=True, **kwargs)


def test_reference_passes_and_result_carries_id_and_time():
    result = run(double)
    assert result.status == PASS and result.passed and bool(result)
    assert result.check_id == "test_grading_core.check_double"
    assert result.seconds >= 0


def test_stub_is_not_implemented():
    def stub(x):
        raise NotImplementedError("double: implement this")

    assert run(stub).status == NOT_IMPLEMENTED


def test_exception_is_an_error_naming_the_exception_and_the_line():
    def broken(x):
        y = x * 2
        return y.reshape(7, 7)

    result = run(broken)
    assert result.status == ERROR
    assert "RuntimeError" in result.message and "line" in result.message


def test_wrong_return_type_fails_with_a_specific_hint():
    result = run(lambda x: (2 * x).tolist())
    assert result.status == FAIL
    assert "expected a torch.Tensor, got a list" in result.message


def test_a_value_the_checker_cannot_use_is_reported_as_the_students_return_value():
    @checker("Exercise 0.2: pair")
    def check_pair(fn) -> None:
        w, i = fn(torch.ones(3))  # unpacking a tensor of 3 values fails inside the checker
        expect_close(w, torch.ones(3), "")

    result = check_pair(lambda x: x, quiet=True)
    assert result.status == FAIL
    assert "could not use what your function returned (a tensor of shape (3,)" in result.message


def test_returning_none_asks_for_a_return_statement():
    def forgot_return(x):
        2 * x

    result = run(forgot_return)
    assert result.status == FAIL and "forget a `return`" in result.message


def test_allow_none_accepts_none():
    @checker("Exercise 0.3: nothing", allow_none=True)
    def check_nothing(fn) -> None:
        fn()

    assert check_nothing(lambda: None, quiet=True).status == PASS


@pytest.mark.parametrize("mutate", [
    lambda x: x.mul_(2),
    lambda x: (x.__setitem__(0, 0.0), 2 * x)[1],
    lambda x: x.resize_(6).mul(2).reshape(2, 3),
])
def test_mutated_input_is_detected(mutate):
    result = run(mutate)
    assert result.status == FAIL
    assert "modified its input `x`" in result.message


def test_mutation_inside_a_list_or_module_is_detected():
    @checker("Exercise 0.4: layers")
    def check_layers(fn) -> None:
        layers = [torch.nn.Linear(2, 2) for _ in range(2)]
        fn(layers, torch.zeros(2))

    def zero_weights(layers, x):
        with torch.no_grad():
            layers[1].weight.zero_()
        return x

    result = check_layers(zero_weights, quiet=True)
    assert result.status == FAIL and "`layers[1].weight`" in result.message
    assert check_layers(lambda layers, x: x + 1, quiet=True).status == PASS


def test_check_mutation_false_allows_in_place_edits():
    @checker("Exercise 0.5: in place", check_mutation=False)
    def check_inplace(fn) -> None:
        x = torch.ones(3)
        fn(x)
        expect_close(x, torch.zeros(3), "zero x in place")

    assert check_inplace(lambda x: x.zero_(), quiet=True).status == PASS


def test_nan_inputs_left_alone_are_not_a_mutation():
    @checker("Exercise 0.6: nan")
    def check_nan(fn) -> None:
        fn(torch.tensor([1.0, float("nan")]))

    assert check_nan(lambda x: x + 1, quiet=True).status == PASS


@pytest.mark.skipif(not can_time_limit(), reason="SIGALRM time limit needs POSIX and the main thread")
def test_endless_loop_times_out_and_leaves_no_alarm_behind():
    def endless(x):
        while True:
            pass

    def swallowing(x):  # one bare except cannot swallow the (re-firing) alarm
        try:
            while True:
                pass
        except:  # noqa: E722
            pass
        while True:
            pass

    timer, handler = signal.getitimer(signal.ITIMER_REAL), signal.getsignal(signal.SIGALRM)  # pytest-timeout's
    for fn in (endless, swallowing):
        start = time.monotonic()
        result = run(fn, timeout=0.5)
        assert result.status == TIMEOUT and "timed out after 0.5 s" in result.message
        assert time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGALRM) == handler
    after = signal.getitimer(signal.ITIMER_REAL)
    assert after == (0.0, 0.0) if timer[0] == 0 else 0 < after[0] <= timer[0]
    time.sleep(0.6)  # a stray alarm would raise here
    assert run(double, timeout=0.5).status == PASS


@pytest.mark.skipif(not can_time_limit(), reason="SIGALRM time limit needs POSIX and the main thread")
def test_an_outer_alarm_is_restored():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        assert run(double, timeout=5).status == PASS
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0 < remaining <= 1.0
        time.sleep(remaining + 0.2)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_outside_the_main_thread_the_check_runs_without_a_limit():
    results = []
    worker = threading.Thread(target=lambda: results.append((can_time_limit(), run(double, timeout=0.1))))
    worker.start()
    worker.join(30)
    assert results and results[0][0] is False and results[0][1].status == PASS


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv("MOE_COURSE_CHECK_TIMEOUT", raising=False)
    assert check_timeout() == 60.0
    monkeypatch.setenv("MOE_COURSE_CHECK_TIMEOUT", "2.5")
    assert check_timeout() == 2.5 and check_timeout(7) == 7.0
    monkeypatch.setenv("MOE_COURSE_CHECK_TIMEOUT", "0")
    assert check_timeout() is None


def test_megabytes_of_prints_are_capped(capsys):
    def chatty(x):
        for _ in range(2000):
            print("x" * 1000)
        print("to stderr", file=sys.stderr)
        return 2 * x

    result = check_double(chatty)
    out = capsys.readouterr()
    assert result.status == PASS
    assert len(out.out) < 10_000 and out.err == ""
    assert "more characters of your output were hidden" in out.out
    assert out.out.rstrip().endswith("[PASS] Exercise 0.1: double: all checks passed")


def test_a_small_print_is_shown_before_the_result(capsys):
    def debug(x):
        print("shape", tuple(x.shape))
        return 2 * x

    check_double(debug)
    assert capsys.readouterr().out == "shape (2, 3)\n[PASS] Exercise 0.1: double: all checks passed\n"


def test_stdout_is_restored_after_an_error_or_timeout():
    before = sys.stdout, sys.stderr
    run(lambda x: 1 / 0)
    if can_time_limit():
        run(lambda x: [None for _ in iter(int, 1)], timeout=0.3)
    assert (sys.stdout, sys.stderr) == before


def test_missing_module_is_named():
    def uses_missing(x):
        import moe_course_no_such_module  # noqa: F401

        return 2 * x

    result = run(uses_missing)
    assert result.status == ERROR
    assert "`moe_course_no_such_module`" in result.message and "not installed" in result.message


def test_exit_and_huge_exception_messages_are_contained():
    result = run(lambda x: sys.exit(3))
    assert result.status == ERROR and "exit()" in result.message

    def loud(x):
        raise ValueError("y" * 1_000_000)

    result = run(loud)
    assert result.status == ERROR and "ValueError" in result.message and len(result.message) < 1000


def test_keyboard_interrupt_still_stops_the_check():
    def interrupted(x):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(interrupted)


def test_not_callable_and_checker_bugs_are_errors_not_exceptions():
    assert run(torch.ones(3)).status == ERROR

    @checker("Exercise 0.7: buggy checker")
    def check_buggy(fn) -> None:
        raise RuntimeError("bug in the course")

    result = check_buggy(double, quiet=True)
    assert result.status == ERROR and "bug in the course" in result.message and "please report" in result.message


def test_results_are_appended_to_the_grade_log(tmp_path, monkeypatch):
    log = tmp_path / "grades.jsonl"
    monkeypatch.setenv(GRADE_LOG_ENV, str(log))
    run(double)
    ch02.check_topk_route(lambda logits, k: 1 / 0, quiet=True)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(d["check_id"], d["status"]) for d in lines] == [
        ("test_grading_core.check_double", PASS), ("ch02.check_topk_route", ERROR)]
    assert lines[1]["name"] == "Exercise 2.1: topk_route" and "ZeroDivisionError" in lines[1]["message"]


def test_an_unwritable_grade_log_does_not_break_the_check(tmp_path, monkeypatch):
    monkeypatch.setenv(GRADE_LOG_ENV, str(tmp_path / "missing_dir" / "log.jsonl"))
    assert run(double).status == PASS


def test_describe_and_str():
    assert describe(torch.zeros(2, 3)) == "a tensor of shape (2, 3) and dtype float32"
    assert describe([1, torch.zeros(1)]).startswith("a list of 2 item(s) (int, a tensor")
    assert str(CheckResult("n", TIMEOUT, "m")) == "[TIMEOUT] n: m"


def test_a_real_grader_names_an_in_place_edit_of_the_students_input():
    def topk_route(logits, k):
        logits -= logits.max(dim=-1, keepdim=True).values  # "stabilise" in place: the caller's logits change
        w, i = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        return w / w.sum(-1, keepdim=True), i

    result = ch02.check_topk_route(topk_route, quiet=True)
    assert result.status == FAIL and "modified its input `logits`" in result.message
    assert result.check_id == "ch02.check_topk_route"


@checker("Exercise 0.9: no package mask", forbid=("moe_course.dispatch.capacity_mask",))
def check_no_package_mask(fn) -> None:
    fn()


def test_a_module_first_imported_during_a_forbid_gets_the_original_back():
    """A package module imported for the first time inside a check binds the stub; afterwards it must
    hold the real function again, or every later use of that module would fail."""
    import types

    from moe_course import dispatch

    name = "moe_course._imported_during_forbid"

    def student():
        module = types.ModuleType(name)
        exec("from moe_course.dispatch import capacity_mask", module.__dict__)
        sys.modules[name] = module
        return module.capacity_mask

    try:
        result = check_no_package_mask(student, quiet=True)
        assert result.status == PASS
        assert sys.modules[name].capacity_mask is dispatch.capacity_mask
        assert dispatch.capacity_mask.__name__ == "capacity_mask"
    finally:
        sys.modules.pop(name, None)
