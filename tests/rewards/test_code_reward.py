"""code_tests_reward: honest programs score their pass fraction; tricks score nothing."""

from __future__ import annotations

import pytest

from posttrain.rewards.code import code_tests_reward, extract_code, pass_tag, split_tests

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def score(completion: str, tests: list[str] | str = TESTS) -> float:
    return code_tests_reward(["write add"], [completion], tests=[tests], wall_time_s=3.0)[0]


def test_correct_solution_scores_one():
    assert score("Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.") == 1.0


def test_wrong_solution_scores_zero():
    # a - b - 1: add(1, 2) = -2, add(-1, 1) = -3, add(2, 2) = -1 -> none match -> 0/3
    assert score("def add(a, b):\n    return a - b - 1") == 0.0


def test_partial_solution_scores_its_fraction():
    # add = 3: add(1, 2) == 3 passes, add(-1, 1) == 0 and add(2, 2) == 4 fail -> 1/3
    assert score("def add(a, b):\n    return 3") == pytest.approx(1 / 3)


def test_string_tests_count_each_assert_and_run_setup_statements():
    tests = "import math\nassert add(1, 2) == 3\nassert math.isclose(add(0.1, 0.2), 0.3)\nassert add(1, 1) == 3"
    assert score("def add(a, b):\n    return a + b", tests) == pytest.approx(2 / 3)


@pytest.mark.parametrize("trick", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit(0)",
])
def test_exiting_before_the_tests_scores_zero(trick):
    assert score(trick) == 0.0


def test_printing_pass_lines_scores_zero():
    fake = "print('\\n'.join(f'{i}:pass' for i in range(3)))\nprint('ok ok ok')\nimport os\nos._exit(0)"
    assert score(fake) == 0.0


def test_patched_assertion_error_and_builtins_score_zero():
    trick = ("import builtins\nclass Quiet(Exception): pass\nbuiltins.AssertionError = Quiet\n"
             "builtins.isinstance = lambda *a: True\nbuiltins.all = lambda *a: True\n"
             "def add(a, b):\n    return None")
    assert score(trick) == 0.0


def test_always_equal_objects_score_zero():
    trick = ("class Anything:\n    def __eq__(self, other): return True\n"
             "    def __bool__(self): return True\n    __hash__ = object.__hash__\n"
             "def add(a, b):\n    return Anything()")
    assert score(trick) == 0.0


@pytest.mark.parametrize("snoop", [
    "import sys\nprint(sys._getframe(1).f_locals)",
    "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    print(e.__traceback__.tb_frame.f_back.f_locals)",
    "import gc\nprint([o for o in gc.get_objects() if isinstance(o, bytes)])",
    "import sys\nsys.settrace(lambda frame, event, arg: print(frame.f_back.f_locals))",
    "print(open('/proc/self/mem', 'rb'))",
    "import ctypes",
    "import sys\nprint(repr(sys.stdin.read()))\nraise SystemExit(0)",
])
def test_reaching_for_the_nonce_scores_zero(snoop):
    # each snoop is refused (the exception ends the solution before add exists) or exits early
    assert score(snoop + "\ndef add(a, b):\n    return a + b") == 0.0


def test_stdin_is_empty_by_the_time_the_solution_runs():
    # reading stdin is allowed but yields nothing, and the honest add still scores 1
    code = "import sys\nassert sys.stdin.read() == ''\ndef add(a, b):\n    return a + b"
    assert score(code) == 1.0


def test_infinite_loop_and_fork_bomb_score_zero_within_the_deadline():
    assert score("while True:\n    pass") == 0.0
    assert score("import os\nwhile True:\n    os.fork()") == 0.0


def test_tags_depend_on_nonce_and_index():
    # sha256 of a per-run secret: a different nonce or index gives a different tag
    assert pass_tag("a" * 64, 0) != pass_tag("b" * 64, 0)
    assert pass_tag("a" * 64, 0) != pass_tag("a" * 64, 1)
    assert len(pass_tag("a" * 64, 0)) == 64


def test_rows_are_scored_independently_in_parallel():
    completions = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return 0", "syntax error("]
    scores = code_tests_reward(["p"] * 3, completions, tests=[TESTS] * 3, wall_time_s=3.0, concurrency=2)
    # add = 0 passes only add(-1, 1) == 0 -> 1/3
    assert scores == pytest.approx([1.0, 1 / 3, 0.0])


def test_tests_column_is_read_by_name():
    scores = code_tests_reward(["p"], ["def add(a, b):\n    return a + b"], unit_tests=[TESTS],
                               tests_column="unit_tests", wall_time_s=3.0)
    assert scores == [1.0]
    with pytest.raises(KeyError, match="unit_tests"):
        code_tests_reward(["p"], ["x = 1"], tests_column="unit_tests")


def test_extract_code_takes_the_last_python_block_else_everything():
    text = "```python\nfirst()\n```\nthen\n```py\nsecond()\n```"
    assert extract_code(text) == "second()\n"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("```python\nunclosed()") == "unclosed()"


def test_split_tests_marks_asserts_as_tests():
    steps = split_tests("import math\nassert f(1) == 2\nx = 3\nassert f(x)", row=0)
    assert steps == [("import math", False), ("assert f(1) == 2", True), ("x = 3", False), ("assert f(x)", True)]
    with pytest.raises(ValueError, match="row 4: no tests"):
        split_tests([], row=4)


def test_a_failing_check_call_beside_top_level_asserts_is_a_failed_test():
    # HumanEval keeps its asserts inside check(candidate): beside a top-level assert, the failing call was run as
    # setup and its failure swallowed, so a wrong solution scored 1.0 (audit). Now: 1 of 2 tests
    tests = "assert add(0, 0) == 0\ndef check(candidate):\n    assert candidate(1, 2) == 3\ncheck(add)"
    wrong = code_tests_reward(["p"], ["def add(a, b):\n    return 0"], tests=[tests], wall_time_s=3.0)
    right = code_tests_reward(["p"], ["def add(a, b):\n    return a + b"], tests=[tests], wall_time_s=3.0)
    assert wrong == [0.5] and right == [1.0]
