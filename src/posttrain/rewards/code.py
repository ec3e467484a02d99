"""Reward code completions by running their tests in the sandbox.

    code_tests_reward(prompts, completions, tests=[["assert add(1, 2) == 3", ...], ...]) -> [0.5, ...]

Score per row = (tests passed) / (tests), a dense signal that GRPO-style group baselines can use.
Two kinds of tests, told apart by their shape (`parse_tests`):

- functional (MBPP asserts, HumanEval's `check(candidate)`, unittest classes): the tests run in a
  checker process and the model's code in a separate server process, each in its own sandbox
  (`sandbox.run_linked`, `code_harness.py`). The server receives only the calls the tests make and
  answers with plain data; every comparison happens in the checker, which alone writes verdicts. No
  expected value, test source or pass signal is ever in, or reachable from, the process that runs
  the model's code.
- stdin/stdout (APPS, CodeContests, LiveCodeBench, open-r1): one sandboxed run of the program per
  case, its stdout compared by the parent with LiveCodeBench's rule (`outputs_match`).

Scheduling (docs/sandbox.md, "Throughput"): every row first gets a short first pass
(`first_pass_s`); rows that need longer run again with the full `wall_time_s` once no row waits for
its first pass, so looping completions cannot starve the others. The whole call fits in
`time_budget_s` (by default what is left of the RewardSet call that runs it); when it runs out, or
the caller abandons the call, every running sandbox is killed, and a test that has not passed by
then has failed. A row that times out scores the tests it passed, on its own: it is not a failure of
the reward.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

from posttrain.rewards.base import completion_text
from posttrain.rewards.sandbox import Program, SandboxLimits, SandboxResult, probe_isolation, run_linked, run_python
from posttrain.rewards.scoring import current_reward_call

logger = logging.getLogger("posttrain.rewards")

FENCED_PYTHON = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
HARNESS = Path(__file__).with_name("code_harness.py").read_text(encoding="utf-8")
"""main.py of both programs of a functional run."""
CALL_MARGIN_S = 1.0
"""Seconds kept back from the RewardSet call's deadline for killing sandboxes and returning."""
MIN_RUN_S = 0.05
"""A run is not started with less time than this left of the budget."""


@dataclass(frozen=True)
class Step:
    """One statement group of a functional test string, run in order in the checker."""

    source: str
    kind: str
    """"setup" (its failure fails no test), "test" (one test) or "case" (a unittest.TestCase class)."""
    tests: tuple[int, ...] = ()
    """The ordinals of the tests this step holds: one for a test, one per test method for a case."""
    name: str = ""
    """A case's class name."""
    methods: tuple[str, ...] = ()
    """A case's test methods, in the order of `tests`."""


@dataclass(frozen=True)
class FunctionTests:
    steps: tuple[Step, ...]
    count: int


@dataclass(frozen=True)
class StdioTests:
    cases: tuple[tuple[str, str], ...]
    """(stdin, expected stdout) per case."""

    @property
    def count(self) -> int:
        return len(self.cases)


def code_tests_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any] | None = None,
    *,
    tests: Sequence[Any] | None = None,
    tests_column: str = "tests",
    entry_point_column: str = "entry_point",
    wall_time_s: float = 10.0,
    first_pass_s: float = 2.0,
    time_budget_s: float | None = None,
    memory_mb: int = 1024,
    concurrency: int | None = None,
    strict_values: bool = True,
    **columns: Any,
) -> list[float]:
    """Fraction of each row's tests that its completion's code passes, in [0, 1]; one float per row.

    tests: per row (dataset column `tests_column`), any of
        - a list of test snippets, each one test (MBPP's `test_list`);
        - one string of Python whose top-level `assert` statements and calls are tests, and whose
          `unittest.TestCase` classes hold one test per `test*` method; other statements (imports,
          `def check(candidate)`) run in order between them. When it defines `check` but never calls
          it and the row has an entry point (`entry_point_column`, HumanEval's), `check(<entry point>)`
          is its test;
        - stdin/stdout cases: {"inputs": [...], "outputs": [...]} (APPS; also as a JSON string),
          {"input": [...], "output": [...]} (CodeContests), {"test_cases": [...]} (open-r1), or a
          list of {"input": str, "output": str} (LiveCodeBench's stdin tests).
    wall_time_s: seconds per run (a functional row is one run, a stdin/stdout case one run each).
    first_pass_s: seconds each run gets first; one that needs longer runs again with wall_time_s
        once every row has had its first pass.
    time_budget_s: seconds for the whole call. None: what is left of the RewardSet call's timeout_s
        (less a second), unbounded outside one.
    strict_values: the tests compare plain data only: the solution's answers arrive as built-in
        values, and comparing, hashing or `in` on an object the solution keeps (a remote object)
        raises TypeError. Turn off for tasks whose tests compare objects the solution defines; their
        comparisons are then answered by the solution itself.
    concurrency: runs at once (a functional run is two processes that mostly take turns). Default:
        up to 2 cores.
    """
    per_row_tests = _column(tests if tests_column == "tests" else columns.get(tests_column), tests_column,
                            columns, len(completions), given=tests is not None)
    entry_points = columns.get(entry_point_column)
    plans = [
        parse_tests(per_row_tests[row], row, entry_point=entry_points[row] if entry_points is not None else None)
        for row in range(len(completions))
    ]
    codes = [extract_code(completion_text(c)) for c in completions]
    _warn_without_namespaces()
    limits = SandboxLimits(wall_time_s=wall_time_s, cpu_time_s=max(1, math.ceil(wall_time_s)),
                           memory_bytes=memory_mb << 20)
    deadline, cancel = _call_bounds(time_budget_s)
    schedule = _Schedule(codes, plans, limits, first_pass_s=min(first_pass_s, wall_time_s), deadline=deadline,
                         cancel=cancel, strict=strict_values)
    return schedule.run(concurrency or max(1, min(2, os.cpu_count() or 1)))


@cache
def _warn_without_namespaces() -> None:
    layers = probe_isolation()
    if "pidns" not in layers:
        logger.warning("code_tests: no PID namespace here (isolation %s): the solution can reach the checker's "
                       "process, so a score is not safe from reward hacking (docs/sandbox.md, Fallbacks)", layers)


def extract_code(text: str) -> str:
    """The last ```python fenced block of `text` (an unclosed final block counts), else all of it."""
    blocks = FENCED_PYTHON.findall(text)
    return blocks[-1] if blocks else text


# ---------------------------------------------------------------------------------------------
# Tests: their shapes


def parse_tests(tests: Any, row: int, *, entry_point: str | None = None) -> FunctionTests | StdioTests:
    """A row's tests as functional steps or stdin/stdout cases (see code_tests_reward); ValueError naming
    the row when they are neither or hold no test."""
    where = f"code_tests_reward: row {row}"
    if isinstance(tests, str) and tests.lstrip().startswith(("{", "[{")):
        with contextlib.suppress(ValueError):  # else Python test source that opens with a dict or list display
            tests = json.loads(tests)
    if isinstance(tests, Mapping) or (isinstance(tests, Sequence) and tests and isinstance(tests[0], Mapping)):
        return _stdio_cases(tests, where)
    if isinstance(tests, str):
        steps = split_tests(tests, entry_point=entry_point)
    elif isinstance(tests, Sequence) and all(isinstance(t, str) for t in tests):
        steps = [Step(t, "test", (i,)) for i, t in enumerate(tests)]
    else:
        raise ValueError(f"{where}: tests must be Python test source, a list of test snippets or stdin/stdout "
                         f"cases, got a {type(tests).__name__}")
    count = sum(len(s.tests) for s in steps)
    if count == 0:
        raise ValueError(f"{where}: no tests (got {tests!r})")
    return FunctionTests(tuple(steps), count)


def split_tests(source: str, *, entry_point: str | None = None) -> list[Step]:
    """The steps of a test string, numbering its tests 0, 1, ... in order."""
    try:
        statements = ast.parse(source).body
    except SyntaxError:
        return [Step(source, "test", (0,))]  # fails to compile in the checker and scores 0
    steps: list[Step] = []
    count = 0
    for statement in statements:
        segment = ast.get_source_segment(source, statement) or ""
        if _is_unittest_main(statement):
            continue  # would exit; the checker runs the test methods itself
        methods = _test_methods(statement)
        if methods:
            assert isinstance(statement, ast.ClassDef)
            steps.append(Step(segment, "case", tuple(range(count, count + len(methods))), statement.name, methods))
            count += len(methods)
        elif _is_test(statement):
            steps.append(Step(segment, "test", (count,)))
            count += 1
        else:
            steps.append(Step(segment, "setup"))
    if count == 0 and entry_point and _defines_check(statements):
        steps.append(Step(f"check({entry_point})", "test", (0,)))
    return steps


def _is_test(statement: ast.stmt) -> bool:
    """A top-level assert, or a call (HumanEval's `check(candidate)`, whose asserts sit inside `check`): a failing
    one is a failed test, where a failing import or assignment only leaves later tests without what it defines."""
    call = isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
    return isinstance(statement, ast.Assert) or call


def _is_unittest_main(statement: ast.stmt) -> bool:
    if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
        return False
    func = statement.value.func
    return isinstance(func, ast.Attribute) and func.attr == "main" and ast.unparse(func.value) == "unittest"


def _test_methods(statement: ast.stmt) -> tuple[str, ...]:
    """The `test*` methods of a class whose base is a TestCase (unittest.TestCase, TestCase, ...)."""
    if not isinstance(statement, ast.ClassDef):
        return ()
    bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in statement.bases]
    if not any(b.endswith("TestCase") for b in bases):
        return ()
    defs = (ast.FunctionDef, ast.AsyncFunctionDef)
    return tuple(s.name for s in statement.body if isinstance(s, defs) and s.name.startswith("test"))


def _defines_check(statements: list[ast.stmt]) -> bool:
    return any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in statements)


def _stdio_cases(tests: Any, where: str) -> StdioTests:
    if isinstance(tests, Mapping):
        if "fn_name" in tests:
            raise ValueError(f"{where}: call-based tests (fn_name) are not supported; write them as asserts")
        if "test_cases" in tests:
            return _stdio_cases(tests["test_cases"], where)
        inputs, outputs = _first_key(tests, ("inputs", "input"), where), _first_key(tests, ("outputs", "output"), where)
        if not isinstance(inputs, Sequence) or not isinstance(outputs, Sequence) or len(inputs) != len(outputs):
            raise ValueError(f"{where}: stdin/stdout tests need equally long lists of inputs and outputs")
        pairs = list(zip(inputs, outputs))
    else:
        for i, case in enumerate(tests):
            if not isinstance(case, Mapping) or "input" not in case or "output" not in case:
                raise ValueError(f"{where}: case {i} must be a mapping with 'input' and 'output', got {case!r:.80}")
            if case.get("testtype", "stdin") != "stdin" or case.get("type", "stdin_stdout") != "stdin_stdout":
                raise ValueError(f"{where}: case {i} is not a stdin/stdout test ({case!r:.80}); write it as asserts")
        pairs = [(case["input"], case["output"]) for case in tests]
    for i, (stdin, stdout) in enumerate(pairs):
        if not isinstance(stdin, str) or not isinstance(stdout, str):
            raise ValueError(f"{where}: case {i}: input and output must be strings, got "
                             f"{type(stdin).__name__} and {type(stdout).__name__}")
    if not pairs:
        raise ValueError(f"{where}: no tests (no stdin/stdout cases)")
    return StdioTests(tuple(pairs))


def _first_key(tests: Mapping, keys: tuple[str, ...], where: str) -> Any:
    for key in keys:
        if key in tests:
            return tests[key]
    raise ValueError(f"{where}: stdin/stdout tests need '{keys[0]}' (or '{keys[1]}'); keys: {sorted(tests)}")


def outputs_match(got: str, expected: str) -> bool:
    """LiveCodeBench's rule: the same lines once the whole output and each line are stripped; a line that
    differs still matches when its whitespace-separated tokens are equal as decimal numbers."""
    got_lines = [line.strip() for line in got.strip().split("\n")]
    expected_lines = [line.strip() for line in expected.strip().split("\n")]
    if len(got_lines) != len(expected_lines):
        return False
    return all(g == e or _same_decimals(g, e) for g, e in zip(got_lines, expected_lines))


def _same_decimals(got: str, expected: str) -> bool:
    try:
        return [Decimal(t) for t in got.split()] == [Decimal(t) for t in expected.split()]
    except (InvalidOperation, ValueError):
        return False


def _column(values: Any, column: str, columns: dict[str, Any], rows: int, *, given: bool) -> Sequence[Any]:
    if values is None:
        available = ", ".join(sorted(["tests", *columns] if given else columns)) or "none"
        raise KeyError(f"code_tests_reward: dataset column '{column}' is missing; columns: {available}")
    if len(values) != rows:
        raise ValueError(f"code_tests_reward: column '{column}' has {len(values)} rows, completions {rows}")
    return values


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class _Outcome:
    passed: frozenset[int]
    hit_time_limit: bool
    """The run ended at its wall or CPU limit: with more time it might pass more."""


def run_function_tests(code: str, tests: FunctionTests, limits: SandboxLimits, *, strict: bool = True,
                       cancel: threading.Event | None = None) -> _Outcome:
    """One linked run: checker and solution server (code_harness.py)."""
    steps = [dataclasses.asdict(step) for step in tests.steps]
    checker = Program(HARNESS, json.dumps({"role": "checker", "strict": strict, "steps": steps}))
    server = Program(HARNESS, json.dumps({"role": "server", "code": code}))
    checked, served = run_linked(checker, server, limits=limits, cancel=cancel)
    hit = checked.timed_out or _hit_cpu_limit(checked) or _hit_cpu_limit(served)
    return _Outcome(_verdicts(checked.stdout, tests.count), hit)


def run_stdio_case(code: str, stdin: str, expected: str, limits: SandboxLimits, *,
                   cancel: threading.Event | None = None) -> _Outcome:
    """One run of the program on one case; it passes by exiting 0 with the expected output."""
    result = run_python(code, stdin=stdin, limits=limits, cancel=cancel)
    passed = frozenset({0}) if result.ok and outputs_match(result.stdout, expected) else frozenset()
    return _Outcome(passed, result.timed_out or _hit_cpu_limit(result))


def _verdicts(stdout: str, count: int) -> frozenset[int]:
    """The tests the checker reported as passed; a line cut by a kill does not count."""
    lines = stdout.split("\n")[:-1]
    return frozenset(int(line[5:]) for line in lines if re.fullmatch(r"pass \d{1,9}", line) and int(line[5:]) < count)


def _hit_cpu_limit(result: SandboxResult) -> bool:
    return result.killed_by_signal == signal.SIGXCPU


# ---------------------------------------------------------------------------------------------
# Scheduling


def _call_bounds(time_budget_s: float | None) -> tuple[float | None, threading.Event]:
    """(monotonic deadline or None, cancel event) from the budget and the RewardSet call, if any."""
    now = time.monotonic()
    deadline = None if time_budget_s is None else now + time_budget_s
    call = current_reward_call()
    if call is None:
        return deadline, threading.Event()
    if call.deadline is not None:
        ours = call.deadline - min(CALL_MARGIN_S, 0.1 * max(0.0, call.deadline - now))
        deadline = ours if deadline is None else min(deadline, ours)
    return deadline, call.cancelled


@dataclass
class _Row:
    runs: int
    next_run: int = 0
    full: bool = False
    """In its full pass (after a run hit the first pass's limit)."""
    busy: bool = False
    done: bool = False
    passed: set[int] = dataclasses.field(default_factory=set)


class _Schedule:
    """Worker threads take runs: a row's first-pass runs before any row's full-pass runs; one run per
    row at a time, in order; a row stops at a run that hits the full limit. See the module docstring."""

    def __init__(self, codes: list[str], plans: list[FunctionTests | StdioTests], limits: SandboxLimits, *,
                 first_pass_s: float, deadline: float | None, cancel: threading.Event, strict: bool):
        self.codes, self.plans, self.limits = codes, plans, limits
        self.first_pass_s, self.deadline, self.cancel, self.strict = first_pass_s, deadline, cancel, strict
        self.rows = [_Row(runs=len(p.cases) if isinstance(p, StdioTests) else 1) for p in plans]
        self.lock = threading.Condition()
        self.error: BaseException | None = None

    def run(self, workers: int) -> list[float]:
        threads = [threading.Thread(target=self._work, name=f"posttrain-code-{i}", daemon=True)
                   for i in range(min(workers, len(self.rows)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.error is not None:
            raise self.error
        return [len(row.passed) / plan.count for row, plan in zip(self.rows, self.plans)]

    def _work(self) -> None:
        try:
            while (task := self._next()) is not None:
                index, run, limits = task
                outcome = self._execute(index, run, limits)
                self._finish(index, run, outcome)
        except BaseException as err:  # re-raised in the calling thread
            with self.lock:
                self.error = self.error or err
                self.cancel.set()
                self.lock.notify_all()

    def _next(self) -> tuple[int, int, SandboxLimits] | None:
        with self.lock:
            while True:
                left = math.inf if self.deadline is None else self.deadline - time.monotonic()
                if self.cancel.is_set() or left < MIN_RUN_S:
                    return None
                waiting = [i for i, r in enumerate(self.rows) if not (r.busy or r.done)]
                if waiting:
                    index = min(waiting, key=lambda i: self.rows[i].full)  # first passes first, then row order
                    row = self.rows[index]
                    row.busy = True
                    return index, row.next_run, self._limits(row.full, left)
                if not any(r.busy for r in self.rows):
                    return None
                self.lock.wait(timeout=min(left, 0.5))

    def _limits(self, full: bool, left: float) -> SandboxLimits:
        wall = min(self.limits.wall_time_s if full else self.first_pass_s, left)
        cpu = self.limits.cpu_time_s if full else max(1, math.ceil(self.first_pass_s))
        return dataclasses.replace(self.limits, wall_time_s=wall, cpu_time_s=cpu)

    def _execute(self, index: int, run: int, limits: SandboxLimits) -> _Outcome:
        plan, code = self.plans[index], self.codes[index]
        if isinstance(plan, StdioTests):
            stdin, expected = plan.cases[run]
            outcome = run_stdio_case(code, stdin, expected, limits, cancel=self.cancel)
            return _Outcome(frozenset({run}) if outcome.passed else frozenset(), outcome.hit_time_limit)
        return run_function_tests(code, plan, limits, strict=self.strict, cancel=self.cancel)

    def _finish(self, index: int, run: int, outcome: _Outcome) -> None:
        with self.lock:
            row = self.rows[index]
            row.passed |= outcome.passed
            row.busy = False
            if outcome.hit_time_limit and not row.full and self.first_pass_s < self.limits.wall_time_s:
                row.full = True  # the same run again, with the full limit
            elif outcome.hit_time_limit:
                row.done = True  # timed out with the full limit: its later runs would too, and they fail
            else:
                row.next_run = run + 1
                row.done = row.next_run == row.runs
            self.lock.notify_all()
