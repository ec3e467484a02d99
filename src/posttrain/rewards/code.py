"""Reward code completions by running unit tests on them in the sandbox.

    code_tests_reward(prompts, completions, tests=[["assert add(1, 2) == 3", ...], ...]) -> [0.5, ...]

Score per row = (tests passed) / (tests), a dense signal that GRPO-style group baselines can use;
a row whose program exits, crashes, times out or prints too much before the tests finish keeps only
the tests it passed before that.

The pass signal is not the exit code and not anything the program can print. The parent draws a
random nonce per row and sends it, with the code and the tests, on stdin. The harness (HARNESS) reads
all of stdin and closes it *before* the model's code runs, keeps the nonce in a function local, and
after each passing test writes sha256(nonce + b":<index>:pass"). The parent counts only tags it can
recompute. A program that exits early, patches builtins, redefines AssertionError or prints lines of
its own cannot produce a tag, and tags it sees reveal nothing about the nonce. What else the harness
does (an audit hook, strict comparisons) and what it cannot stop are in docs/sandbox.md.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from posttrain.rewards.base import completion_text
from posttrain.rewards.sandbox import SandboxLimits, run_python

FENCED_PYTHON = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def code_tests_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any] | None = None,
    *,
    tests: Sequence[str | Sequence[str]] | None = None,
    tests_column: str = "tests",
    wall_time_s: float = 10.0,
    memory_mb: int = 1024,
    concurrency: int | None = None,
    strict_values: bool = True,
    **columns: Any,
) -> list[float]:
    """Fraction of each row's tests that its completion's code passes, in [0, 1]; one float per row.

    tests: per row, a list of test snippets (each one test) or one string, whose top-level `assert`
        statements and calls (`check(candidate)`, HumanEval's) are the tests (other statements, such as imports
        and definitions, run in order between them).
        Read from the dataset column `tests_column`.
    strict_values: comparison operands and assert values in the tests must be plain data (exact
        int/float/complex/bool/str/bytes/None and lists, tuples, dicts, sets of them), so an object
        whose __eq__ always returns True cannot pass `assert f(x) == y`. Turn off for tasks whose
        tests compare objects the solution defines.
    concurrency: sandboxed runs at once; each is one single-threaded process. Default: up to 2 cores.
    """
    per_row_tests = _tests_column(tests, tests_column, columns, len(completions))
    limits = SandboxLimits(wall_time_s=wall_time_s, cpu_time_s=max(1, int(wall_time_s)),
                           memory_bytes=memory_mb << 20)
    workers = concurrency or max(1, min(2, os.cpu_count() or 1))
    rows = range(len(completions))

    def score(row: int) -> float:
        code = extract_code(completion_text(completions[row]))
        return score_code(code, split_tests(per_row_tests[row], row), limits, strict_values=strict_values)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(score, rows))


def extract_code(text: str) -> str:
    """The last ```python fenced block of `text` (an unclosed final block counts), else all of it."""
    blocks = FENCED_PYTHON.findall(text)
    return blocks[-1] if blocks else text


def split_tests(tests: str | Sequence[str], row: int) -> list[tuple[str, bool]]:
    """Steps to run in order, as (source, counts_as_test)."""
    if isinstance(tests, str):
        steps = _split_test_string(tests)
    else:
        steps = [(str(t), True) for t in tests]
    if not any(counts for _, counts in steps):
        raise ValueError(f"code_tests_reward: row {row}: no tests (got {tests!r})")
    return steps


def _split_test_string(source: str) -> list[tuple[str, bool]]:
    try:
        statements = ast.parse(source).body
    except SyntaxError:
        return [(source, True)]  # runs, fails to compile in the harness, and scores 0
    steps = [(ast.get_source_segment(source, s) or "", _is_test(s)) for s in statements]
    if not any(counts for _, counts in steps):
        return [(source, True)] if source.strip() else []
    return steps


def _is_test(statement: ast.stmt) -> bool:
    """A top-level assert, or a call (HumanEval's `check(candidate)`, whose asserts sit inside `check`): a failing
    one is a failed test, where a failing import or assignment only leaves later tests without what it defines."""
    call = isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
    return isinstance(statement, ast.Assert) or call


def score_code(code: str, steps: list[tuple[str, bool]], limits: SandboxLimits, *,
               strict_values: bool = True) -> float:
    """Run `code` then `steps` in the harness; return passed tests / tests."""
    nonce = secrets.token_hex(32)
    request = {"code": code, "steps": [source for source, _ in steps], "strict": strict_values}
    result = run_python(HARNESS, stdin=nonce + "\n" + json.dumps(request), limits=limits)
    seen = set(result.stdout.split())
    test_indices = [i for i, (_, counts) in enumerate(steps) if counts]
    passed = sum(pass_tag(nonce, i) in seen for i in test_indices)
    return passed / len(test_indices)


def pass_tag(nonce: str, index: int) -> str:
    """What the harness prints when step `index` passes; needs the nonce to compute."""
    return hashlib.sha256(nonce.encode() + b":%d:pass" % index).hexdigest()


def _tests_column(tests: Any, column: str, columns: dict[str, Any], rows: int) -> Sequence[Any]:
    values = tests if column == "tests" else columns.get(column)
    if values is None:
        available = ", ".join(sorted(["tests", *columns] if tests is not None else columns)) or "none"
        raise KeyError(f"code_tests_reward: dataset column '{column}' is missing; columns: {available}")
    if len(values) != rows:
        raise ValueError(f"code_tests_reward: column '{column}' has {len(values)} rows, completions {rows}")
    return values


HARNESS = r'''
def _harness():
    # Everything used after the model's code starts is bound here first, because that code may
    # replace builtins, module attributes or sys.modules entries.
    import ast, builtins, hashlib, json, os, sys, _signal
    read, write, exit_now, sha256 = os.read, os.write, os._exit, hashlib.sha256
    exec_, compile_, type_, dict_, enumerate_ = exec, compile, type, dict, enumerate
    base_exception, type_error, permission_error = BaseException, TypeError, PermissionError
    str_, bytes_, int_, plain_name = str, bytes, int, PLAIN

    chunks = []
    while True:
        chunk = read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    nonce, _, payload = b"".join(chunks).partition(b"\n")
    del chunks
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    request = json.loads(payload)
    del payload

    def strict(tree):
        # Wrap comparison operands and truth-tested values in the plain-data check.
        def wrap(node):
            return ast.Call(ast.Name(plain_name, ast.Load()), [node], [])

        class Strict(ast.NodeTransformer):
            def visit_Compare(self, node):
                self.generic_visit(node)
                node.left, node.comparators = wrap(node.left), [wrap(c) for c in node.comparators]
                return node

            def visit_BoolOp(self, node):
                self.generic_visit(node)
                node.values = [wrap(v) for v in node.values]
                return node

            def visit_UnaryOp(self, node):
                self.generic_visit(node)
                if isinstance(node.op, ast.Not):
                    node.operand = wrap(node.operand)
                return node

            def visit_Assert(self, node):
                self.generic_visit(node)
                node.test = wrap(node.test)
                return node

        return ast.fix_missing_locations(Strict().visit(tree))

    def compile_step(source):
        try:
            tree = ast.parse(source, "<test>", "exec")
            return compile_(strict(tree) if request["strict"] else tree, "<test>", "exec")
        except SyntaxError:
            return None

    steps = [compile_step(s) for s in request["steps"]]
    try:
        solution = compile_(request["code"], "<solution>", "exec")
    except (SyntaxError, ValueError):
        solution = None

    scalars = (int, float, complex, bool, str, bytes, type(None))
    sequences = (list, tuple, set, frozenset)

    def check_plain(value, depth):
        kind = type_(value)
        for t in scalars:
            if kind is t:
                return
        if depth > 64:
            raise type_error("sandbox: value nested too deeply for a test comparison")
        for t in sequences:
            if kind is t:
                for item in value:
                    check_plain(item, depth + 1)
                return
        if kind is dict_:
            for key, item in dict_.items(value):
                check_plain(key, depth + 1)
                check_plain(item, depth + 1)
            return
        raise type_error("sandbox: tests compare plain data only, got a %s" % kind.__name__)

    def plain(value):
        check_plain(value, 0)
        return value

    blocked = ("sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
               "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
               "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.system", "subprocess.Popen",
               "os.symlink", "os.link", "ctypes.", "_posixsubprocess.")
    devices = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")

    def guard(event, args):
        # Frames, the garbage collector, tracing, ctypes and /proc all lead to this frame's locals.
        if event.startswith(blocked):
            raise permission_error("sandbox: %s is disabled in the test harness" % event)
        if event == "object.__getattr__" and "frame" in str_(args[1]):
            raise permission_error("sandbox: frame access is disabled in the test harness")
        if event == "open":
            path, kind = args[0], type_(args[0])
            if kind is int_:
                return
            if kind is bytes_:
                path = path.decode("utf-8", "replace")
            elif kind is not str_:
                # A path-like object could answer differently here and in open() itself.
                raise permission_error("sandbox: open() takes a str path in the test harness")
            if "proc/" in path or path.endswith("proc") or (path.startswith("/dev/") and path not in devices):
                raise permission_error("sandbox: %s is closed in the test harness" % path)

    snapshot = dict_(builtins.__dict__)
    sys.addaudithook(guard)
    # A Python-level signal handler would receive this frame; handlers stay at their defaults.
    def refuse_signal_handler(*args):
        raise permission_error("sandbox: signal.signal is disabled in the test harness")

    _signal.signal = refuse_signal_handler

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    if solution is None:
        exit_now(3)
    try:
        exec_(solution, namespace)
    except base_exception:
        exit_now(4)
    test_namespace = dict_(namespace)
    test_namespace["__builtins__"] = snapshot
    test_namespace[plain_name] = plain
    for index, step in enumerate_(steps):
        if step is None:
            continue
        try:
            exec_(step, test_namespace)
        except base_exception:
            continue
        write(1, b"\n" + sha256(nonce + b":%d:pass" % index).hexdigest().encode() + b"\n")
    exit_now(0)


PLAIN = "__posttrain_plain__"
_harness()
'''
"""Runs as main.py in the sandbox. Reads `nonce\\n{json request}` from stdin; see the module docstring."""
