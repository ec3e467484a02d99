"""The built-in tools: a calculator, a Python interpreter in the code sandbox, a search over a local text corpus.

    TOOLS["calculator"]()              -> Tool
    TOOLS["python"](timeout_s=10)      -> Tool (runs in `rewards.sandbox`: no network, time and memory limits)
    TOOLS["search"](corpus="docs.txt") -> Tool (one passage a line, or a list of passages)
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.envs.tools import Tool

MAX_POWER = 10_000
"""Largest exponent the calculator computes: 2**10**9 would take the process's memory."""
MAX_DIGITS = 4300
"""Largest integer the calculator writes out (Python's own str() limit)."""

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression of numbers, + - * / // % ** and parentheses. Raises ValueError for
    anything else (names, calls, attribute access), a power too large or a division by zero."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {expression[:80]!r} ({err.msg})") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise ValueError(f"the exponent {right} is too large (at most {MAX_POWER})")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
        if isinstance(result, complex):
            raise ValueError("the result is not a real number")
        return result
    raise ValueError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, for example "37*58".
    """
    value = evaluate_arithmetic(expression)
    if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
        raise ValueError(f"the result has more than {MAX_DIGITS} digits")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the result is not finite")
        return repr(int(value)) if value.is_integer() else repr(value)
    return str(value)


def make_calculator(*, timeout_s: float = 5.0, max_output_chars: int = 200) -> Tool:
    return Tool.from_function(calculator, timeout_s=timeout_s, max_output_chars=max_output_chars)


def make_python(*, timeout_s: float = 10.0, max_output_chars: int = 2000, memory_bytes: int = 256 << 20) -> Tool:
    """A Python interpreter: the code runs in the sandbox (`rewards.sandbox`) within `timeout_s` of wall time."""
    from posttrain.rewards.sandbox import SandboxLimits, run_python

    limits = SandboxLimits(wall_time_s=timeout_s, cpu_time_s=max(1, math.ceil(timeout_s)), memory_bytes=memory_bytes,
                           max_output_bytes=max(1024, 4 * max_output_chars))  # fmt: skip

    def python(code: str) -> str:
        """Run a Python program and return what it prints.

        Args:
            code: The program; print the values you need.
        """
        result = run_python(code, limits=limits)
        if result.timed_out:
            raise TimeoutError(f"the program ran past {timeout_s:g} s")
        if result.exit_code != 0:
            tail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.exit_code}"]
            raise RuntimeError(tail[0])
        return result.stdout

    # the sandbox enforces the wall time; the thread's limit only backs it up
    return Tool.from_function(python, timeout_s=timeout_s + 5.0, max_output_chars=max_output_chars)


_WORD = re.compile(r"\w+")


class Corpus:
    """Passages scored against a query by BM25 (Robertson and Zaragoza 2009; k1 = 1.5, b = 0.75)."""

    def __init__(self, passages: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        if not passages:
            raise ValueError("search: the corpus has no passages")
        self.passages = list(passages)
        self.terms = [Counter(_WORD.findall(p.lower())) for p in self.passages]
        self.lengths = [sum(t.values()) for t in self.terms]
        self.mean_length = sum(self.lengths) / len(self.lengths) or 1.0
        self.document_frequency = Counter(term for t in self.terms for term in t)
        self.k1, self.b = k1, b

    @staticmethod
    def from_source(source: str | Path | Sequence[str], base_dir: str | Path | None = None) -> Corpus:
        """A list of passages, or a text file with one passage a line (relative to `base_dir`)."""
        if isinstance(source, str | Path):
            path = Path(source)
            if not path.is_absolute() and base_dir is not None and not path.exists():
                path = Path(base_dir) / path
            if not path.is_file():
                raise ValueError(f"search: corpus file '{source}' does not exist")
            return Corpus([line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])
        return Corpus([str(p) for p in source])

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the k best passages, best first; passages sharing no term with the query are left out."""
        n = len(self.passages)
        scores = []
        for i, (terms, length) in enumerate(zip(self.terms, self.lengths)):
            score = 0.0
            for term in set(_WORD.findall(query.lower())):
                f = terms.get(term, 0)
                if f:
                    df = self.document_frequency[term]
                    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                    score += idf * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * length / self.mean_length))
            if score > 0:
                scores.append((-score, i))
        return [i for _, i in sorted(scores)[:k]]


def make_search(corpus: str | Sequence[str], *, k: int = 3, base_dir: str | Path | None = None,
                timeout_s: float = 5.0, max_output_chars: int = 2000) -> Tool:  # fmt: skip
    index = Corpus.from_source(corpus, base_dir)

    def search(query: str) -> str:
        """Search the documents for passages about the query.

        Args:
            query: Words to look for.
        """
        found = index.top(query, k)
        return "\n".join(index.passages[i] for i in found) if found else "no passage matches the query"

    return Tool.from_function(search, timeout_s=timeout_s, max_output_chars=max_output_chars)


TOOLS: dict[str, Callable[..., Tool]] = {"calculator": make_calculator, "python": make_python, "search": make_search}
"""Built-in tool name -> its factory (keyword arguments: the tool's settings)."""
