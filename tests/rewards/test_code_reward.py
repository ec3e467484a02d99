"""code_tests_reward: honest programs of every benchmark shape score their pass fraction; tricks score nothing.

The attack programs below each won a wrong solution 1.0 (or more than 0) against the harness that ran
the tests in the solution's own process (red-team pass of issue #21); they must score 0 now.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from tests.rewards.live_sandboxes import sandbox_processes

from posttrain.rewards import RewardSet, RewardSpec
from posttrain.rewards.code import (
    FunctionTests,
    StdioTests,
    Step,
    code_tests_reward,
    extract_code,
    outputs_match,
    parse_tests,
    split_tests,
)

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def score(completion: str, tests=TESTS, **kwargs) -> float:
    return code_tests_reward(["write add"], [completion], tests=[tests], wall_time_s=10.0, **kwargs)[0]


def wait_for_no_new_processes(before: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    left = [pid for pid in sandbox_processes() if pid not in before]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [pid for pid in sandbox_processes() if pid not in before]
    return left


# ---------------------------------------------------------------------------------------------
# Scoring


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


def test_rows_are_scored_independently_in_parallel():
    completions = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return 0", "syntax error("]
    scores = code_tests_reward(["p"] * 3, completions, tests=[TESTS] * 3, wall_time_s=10.0, concurrency=2)
    # add = 0 passes only add(-1, 1) == 0 -> 1/3
    assert scores == pytest.approx([1.0, 1 / 3, 0.0])


def test_tests_column_is_read_by_name():
    scores = code_tests_reward(["p"], ["def add(a, b):\n    return a + b"], unit_tests=[TESTS],
                               tests_column="unit_tests", wall_time_s=10.0)
    assert scores == [1.0]
    with pytest.raises(KeyError, match="unit_tests"):
        code_tests_reward(["p"], ["x = 1"], tests_column="unit_tests")


def test_extract_code_takes_the_last_python_block_else_everything():
    text = "```python\nfirst()\n```\nthen\n```py\nsecond()\n```"
    assert extract_code(text) == "second()\n"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("```python\nunclosed()") == "unclosed()"


def test_split_tests_numbers_asserts_calls_and_test_methods():
    source = ("import math\nassert f(1) == 2\nx = 3\ncheck(f)\nimport unittest\n"
              "class T(unittest.TestCase):\n    def test_a(self): pass\n    def helper(self): pass\n"
              "    def test_b(self): pass\nunittest.main()")
    steps = split_tests(source)
    assert [(s.kind, s.tests) for s in steps] == [
        ("setup", ()), ("test", (0,)), ("setup", ()), ("test", (1,)), ("setup", ()), ("case", (2, 3)),
    ]  # unittest.main() is dropped: it would exit
    assert steps[5].name == "T" and steps[5].methods == ("test_a", "test_b")
    with pytest.raises(ValueError, match="row 4: no tests"):
        parse_tests([], row=4)
    with pytest.raises(ValueError, match="row 2: no tests"):
        parse_tests("import math", row=2)


def test_a_failing_check_call_beside_top_level_asserts_is_a_failed_test():
    # HumanEval keeps its asserts inside check(candidate): beside a top-level assert, the failing call was run as
    # setup and its failure swallowed, so a wrong solution scored 1.0 (audit). Now: 1 of 2 tests
    tests = "assert add(0, 0) == 0\ndef check(candidate):\n    assert candidate(1, 2) == 3\ncheck(add)"
    wrong = code_tests_reward(["p"], ["def add(a, b):\n    return 0"], tests=[tests], wall_time_s=10.0)
    right = code_tests_reward(["p"], ["def add(a, b):\n    return a + b"], tests=[tests], wall_time_s=10.0)
    assert wrong == [0.5] and right == [1.0]


# ---------------------------------------------------------------------------------------------
# Real benchmark shapes (false failures, issue #21 item 2): honest solutions 1.0, wrong ones 0.0

HUMANEVAL_0_PROMPT = '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
'''
HUMANEVAL_0_SOLUTION = '''    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if idx != idx2:
                distance = abs(elem - elem2)
                if distance < threshold:
                    return True

    return False
'''
HUMANEVAL_0_TEST = '''

METADATA = {
    'author': 'jt',
    'dataset': 'test'
}


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False
    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0, 2.0], 0.1) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True
    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False

'''
HUMANEVAL_2 = '''

def truncate_number(number: float) -> float:
    return number % 1.0
'''
HUMANEVAL_2_TEST = '''

METADATA = {
    'author': 'jt',
    'dataset': 'test'
}


def check(candidate):
    assert candidate(3.5) == 0.5
    assert abs(candidate(1.33) - 0.33) < 1e-6
    assert abs(candidate(123.456) - 0.456) < 1e-6
'''


def test_humaneval_rows_score_one_for_the_canonical_solution_and_zero_for_a_wrong_one():
    # HumanEval's test field defines check(candidate) and never calls it; the entry point column supplies the call
    fenced = f"```python\n{HUMANEVAL_0_PROMPT}{HUMANEVAL_0_SOLUTION}```"
    wrong = HUMANEVAL_0_PROMPT + "    return False\n"  # check's first assert wants True
    completions = [HUMANEVAL_0_PROMPT + HUMANEVAL_0_SOLUTION, fenced, wrong, HUMANEVAL_2, "def truncate_number(x):\n"
                   "    return int(x)"]
    tests = [HUMANEVAL_0_TEST] * 3 + [HUMANEVAL_2_TEST] * 2
    entry_points = ["has_close_elements"] * 3 + ["truncate_number"] * 2
    scores = code_tests_reward(["p"] * 5, completions, tests=tests, entry_point=entry_points, wall_time_s=10.0)
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0]
    # with the call written out, as the harness of HumanEval appends it
    assert score(HUMANEVAL_0_PROMPT + HUMANEVAL_0_SOLUTION, HUMANEVAL_0_TEST + "\ncheck(has_close_elements)\n") == 1.0


MBPP_2_SOLUTION = ("def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
                   "  return (res) ")
MBPP_2_TESTS = [
    "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
    "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
    "assert set(similar_elements((11, 12, 14, 13),(17, 15, 14, 13))) == set((13, 14))",
]


def test_mbpp_rows_score_their_asserts():
    wrong = "def similar_elements(a, b):\n    return a"
    scores = code_tests_reward(["p"] * 2, [MBPP_2_SOLUTION, wrong], test_list=[MBPP_2_TESTS] * 2,
                               tests_column="test_list", wall_time_s=10.0)
    assert scores == [1.0, 0.0]


def test_solutions_using_typing_namedtuples_and_dataclasses_score_one():
    solution = (
        "from typing import List, Optional\nfrom collections import namedtuple, OrderedDict, Counter\n"
        "from dataclasses import dataclass, field\nimport enum, functools, re\n"
        "Point = namedtuple('Point', 'x y')\n"
        "@dataclass\nclass Box:\n    items: List[int] = field(default_factory=list)\n"
        "class Colour(enum.IntEnum):\n    RED = 1\n"
        "def midpoint(a, b) -> Point:\n    return Point((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)\n"
        "@functools.lru_cache(maxsize=None)\ndef total(xs: tuple) -> int:\n    return sum(Box(list(xs)).items)\n"
        "def counts(text: str) -> Counter:\n    return Counter(re.findall(r'\\w', text))\n"
        "def red() -> Colour:\n    return Colour.RED\n"
    )
    tests = [
        "assert midpoint((0, 0), (2, 4)) == (1.0, 2.0)",
        "assert midpoint((0, 0), (2, 4)).y == 2.0",
        "assert total((1, 2, 3)) == 6",
        "assert counts('abca') == {'a': 2, 'b': 1, 'c': 1}",
        "assert red() == 1",
    ]
    assert score(solution, tests) == 1.0
    assert score(solution.replace("/ 2, (a[1] + b[1]) / 2", "/ 3, 0"), tests) == pytest.approx(3 / 5)


STACK_UNITTEST = '''import unittest


class TestStack(unittest.TestCase):
    def setUp(self):
        self.stack = Stack()

    def test_push_then_pop(self):
        self.stack.push(1)
        self.stack.push(2)
        self.assertEqual(self.stack.pop(), 2)
        self.assertEqual(self.stack.pop(), 1)

    def test_pop_of_an_empty_stack_raises(self):
        with self.assertRaises(IndexError):
            self.stack.pop()

    def test_size(self):
        self.stack.push(5)
        self.assertEqual(len(self.stack), 1)
        self.assertTrue(self.stack)


if __name__ == "__main__":
    unittest.main()
'''
STACK = ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
         "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n"
         "    def __len__(self):\n        return len(self.items)\n")


def test_unittest_classes_count_each_test_method():
    assert score(STACK, STACK_UNITTEST) == 1.0
    # pop takes from the bottom: push-then-pop fails, the other two pass -> 2/3
    assert score(STACK.replace("self.items.pop()", "self.items.pop(0)"), STACK_UNITTEST) == pytest.approx(2 / 3)
    # pop never raises and the size is always 0 -> 0/3
    broken = STACK.replace("return self.items.pop()", "return None").replace("return len(self.items)", "return 0")
    assert score(broken, STACK_UNITTEST) == 0.0


def test_class_based_solutions_answer_method_calls():
    leetcode = ("from typing import List\nclass Solution:\n"
                "    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                "        seen = {}\n        for i, n in enumerate(nums):\n            if target - n in seen:\n"
                "                return [seen[target - n], i]\n            seen[n] = i\n")
    tests = ["assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]",
             "assert Solution().twoSum([3, 2, 4], 6) == [1, 2]", "assert isinstance(Solution(), Solution)"]
    assert score(leetcode, tests) == 1.0
    assert score(leetcode.replace("[seen[target - n], i]", "[i, seen[target - n]]"), tests) == pytest.approx(1 / 3)


def test_in_place_changes_generators_and_exceptions_behave_as_in_python():
    solution = ("def sort_in_place(xs):\n    xs.sort()\n"
                "def countdown(n):\n    while n > 0:\n        yield n\n        n -= 1\n"
                "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n")
    tests = [
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
        "assert list(countdown(3)) == [3, 2, 1]",
        "try:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no ValueError')",
        "assert root(9) == 3.0",
    ]
    assert score(solution, tests) == 1.0
    assert score("def sort_in_place(xs):\n    return sorted(xs)\ndef countdown(n):\n    return [n]\n"
                 "def root(x):\n    return -1", tests) == 0.0


def test_stdin_stdout_cases_in_apps_codecontests_livecodebench_and_open_r1_shapes():
    honest = "a, b = map(int, input().split())\nprint(a + b)"
    wrong = "a, b = map(int, input().split())\nprint(a * b)"  # 1*2 = 2 != 3, 5*7 = 35 != 12
    partial = "print(3)"  # right for the first case only
    inputs, outputs = ["1 2\n", "5 7\n"], ["3\n", "12"]
    shapes = [
        json.dumps({"inputs": inputs, "outputs": outputs}),  # APPS' input_output column is a JSON string
        {"input": inputs, "output": outputs},  # CodeContests
        [{"input": i, "output": o, "testtype": "stdin"} for i, o in zip(inputs, outputs)],  # LiveCodeBench
        {"test_cases": [{"input": i, "output": o, "type": "stdin_stdout"} for i, o in zip(inputs, outputs)]},
    ]
    for shape in shapes:
        assert isinstance(parse_tests(shape, row=0), StdioTests)
        scores = code_tests_reward(["p"] * 3, [honest, wrong, partial], tests=[shape] * 3, wall_time_s=10.0)
        assert scores == [1.0, 0.0, 0.5], shape


def test_outputs_match_follows_livecodebench():
    assert outputs_match("3  \n12\n\n", "3\n12")  # trailing whitespace and blank lines
    assert outputs_match("0.50 1\n", "0.5 1.0")  # numbers compare as decimals
    assert not outputs_match("1 2", "1\n2")  # but the lines must match
    assert not outputs_match("0.333", "0.3333")  # decimals, not a tolerance
    assert not outputs_match("abc", "abd")


def test_stdio_tests_of_other_kinds_are_refused_by_row():
    with pytest.raises(ValueError, match="row 3: call-based"):
        parse_tests({"fn_name": "f", "inputs": [[1]], "outputs": [[2]]}, row=3)
    with pytest.raises(ValueError, match="row 1: case 0 is not a stdin/stdout test"):
        parse_tests([{"input": "[1]", "output": "2", "testtype": "functional"}], row=1)
    with pytest.raises(ValueError, match="row 0: tests must be"):
        parse_tests(42, row=0)


def test_parse_tests_tells_the_shapes_apart():
    assert isinstance(parse_tests(TESTS, row=0), FunctionTests)
    assert parse_tests("assert f() == {'a': 1}", row=0).steps == (Step("assert f() == {'a': 1}", "test", (0,)),)
    assert parse_tests('{"inputs": ["1"], "outputs": ["1"]}', row=0) == StdioTests((("1", "1"),))


# ---------------------------------------------------------------------------------------------
# False passes (issue #21 item 1): a wrong solution must score 0 whatever it does in its process


@pytest.mark.parametrize("trick", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit(0)",
])
def test_exiting_before_the_tests_scores_zero(trick):
    assert score(trick) == 0.0


def test_printing_or_writing_fake_verdicts_scores_zero():
    fake = ("import os, sys, json\nprint('\\n'.join(f'pass {i}' for i in range(3)))\n"
            "os.write(2, b'pass 0\\npass 1\\npass 2\\n')\n"
            # a forged hello on its channel to the checker, claiming add is the number 3
            "body = json.dumps({'names': [['add', 3]]}).encode()\n"
            "os.write(4, len(body).to_bytes(4, 'big') + body)\nos._exit(0)")
    assert score(fake) == 0.0


def test_patched_assertion_error_and_builtins_score_zero():
    trick = ("import builtins\nclass Quiet(Exception): pass\nbuiltins.AssertionError = Quiet\n"
             "builtins.isinstance = lambda *a: True\nbuiltins.all = lambda *a: True\n"
             "def add(a, b):\n    return None")
    assert score(trick) == 0.0


def test_the_tests_own_builtins_and_modules_cannot_be_replaced():
    # the solution's names join the tests' globals, but not over what the tests use as machinery: before, these
    # stand-ins for abs, math and set passed all three tests with a wrong truncate_number
    tests = ["assert abs(truncate_number(1.33) - 0.33) < 1e-6", "assert math.isclose(truncate_number(2.5), 0.5)",
             "assert set(truncate_number(1)) == set((4, 5))"]
    trick = ("abs = lambda *a: 0\nclass Yes:\n    def isclose(self, *a): return True\nmath = Yes()\n"
             "set = lambda *a: 0\ndef truncate_number(x):\n    return 7")
    honest = "import math\ndef truncate_number(x):\n    return (4, 5) if x == 1 else x % 1.0"
    assert code_tests_reward(["p"] * 2, [trick, honest], tests=[tests] * 2, wall_time_s=10.0) == [0.0, 1.0]


@pytest.mark.parametrize("returned", ["Anything()", "Equal([3])", "Equal()"])
def test_always_equal_objects_score_zero(returned):
    # the answer arrives as data: an object stays in the solution's process and cannot be compared (strict),
    # and a list subclass arrives as a plain list, its __eq__ left behind
    trick = ("class Anything:\n    def __eq__(self, other): return True\n"
             "    def __bool__(self): return True\n    __hash__ = object.__hash__\n"
             "class Equal(list):\n    def __eq__(self, other): return True\n    __hash__ = object.__hash__\n"
             f"def add(a, b):\n    return {returned}")
    assert score(trick) == 0.0


def test_strict_values_off_lets_the_solution_compare_its_own_objects():
    point = ("class P:\n    def __init__(self, x): self.x = x\n    def __eq__(self, o): return self.x == o.x\n"
             "def make(x):\n    return P(x)\n")
    tests = ["assert make(1) == make(1)", "assert make(1) != make(2)"]
    assert score(point, tests) == 0.0  # strict: comparing the solution's objects is refused
    assert score(point, tests, strict_values=False) == 1.0


SCAN = r'''
import os, re, hashlib

def memory_of(pid):
    """Every readable mapping of process `pid` through /proc/<pid>/mem, opened by relative path."""
    chunks = []
    try:
        os.chdir("/proc/%s" % pid)
        maps = open("maps").read().splitlines()
        mem = open("mem", "rb", buffering=0)
    except OSError:
        return chunks
    for line in maps:
        addr, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in addr.split("-"))
        if "r" in perms and hi - lo < 1 << 28:
            try:
                mem.seek(lo)
                chunks.append(mem.read(hi - lo))
            except (OSError, OverflowError, ValueError):
                pass
    return chunks

def loot(chunks):
    """Print a pass tag for every 64-hex-digit string (the old harness's nonce); return an expected marker."""
    nonces, marker = set(), None
    for data in chunks:
        nonces.update(re.findall(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])", data))
        found = re.search(rb"EXPECTED-[0-9a-f]{32}", data)
        marker = marker or (found and found.group(0).decode())
    for nonce in list(nonces)[:300]:
        os.write(1, b"\n".join(hashlib.sha256(nonce + b":%d:pass" % i).hexdigest().encode() for i in range(4)) + b"\n")
    return marker
'''

OWN_MEMORY = SCAN + '''
MARKER = loot(memory_of("self"))
def secret():
    return MARKER
'''

EVERY_PROCESS = SCAN + '''
MARKER = None
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    MARKER = loot(memory_of(pid)) or MARKER
def secret():
    return MARKER
'''

FORK_EXEC_CHILD = f"SCAN = {SCAN!r}\nexec(SCAN)\n" + '''
import _posixsubprocess, sys
out = os.path.join(os.environ["HOME"], "loot")
# the parent's pid as the procfs it sees counts pids (the host's, in the old sandbox)
PARENT = "int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])"
CHILD = SCAN + "\\nm = loot(memory_of(%s))\\nopen(%r, 'w').write(m or '')\\n" % (PARENT, out)
exe = sys.executable.encode()
r, w = os.pipe()
pid = _posixsubprocess.fork_exec([exe, b"-I", b"-S", b"-c", CHILD.encode()], [exe], True, (), None, None,
                                 -1, -1, -1, -1, -1, -1, r, w, True, False, -1, -1, None, -1, -1, None, False)
os.close(w)
os.waitpid(pid, 0)
try:
    MARKER = open(out).read() or None
except OSError:
    MARKER = None
def secret():
    return MARKER
'''

SIGNAL_FRAMES = '''
import _imp, hashlib, importlib.machinery, os, sys
_signal = _imp.create_builtin(importlib.machinery.ModuleSpec("_signal", None, origin="built-in"))
_imp.exec_builtin(_signal)
FOUND = []
def look(value):
    if isinstance(value, bytes) and len(value) == 64:
        tags = [hashlib.sha256(value + b":%d:pass" % i).hexdigest().encode() for i in range(4)]
        os.write(1, b"\\n".join(tags) + b"\\n")
    if isinstance(value, str) and "EXPECTED-" in value:
        i = value.index("EXPECTED-")
        FOUND.append(value[i:i + 41])
def handler(signum, frame):
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            for value in list(scope.values()):
                look(value)
                if isinstance(value, (list, tuple, dict)):
                    for item in (value.values() if isinstance(value, dict) else value):
                        look(item)
                        if isinstance(item, dict):
                            for v in item.values():
                                look(v)
        frame = frame.f_back
_signal.signal(_signal.SIGALRM, handler)
_signal.setitimer(_signal.ITIMER_REAL, 0.005, 0.005)
def secret():
    import time
    end = time.time() + 0.05
    while time.time() < end:
        pass
    return FOUND[0] if FOUND else None
'''

GC_OBJECTS = '''
import gc, sys
def secret():
    for obj in gc.get_objects():
        for value in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()):
            if isinstance(value, str) and "EXPECTED-" in value:
                i = value.index("EXPECTED-")
                return value[i:i + 41]
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if isinstance(value, str) and "EXPECTED-" in value:
                return value
        frame = frame.f_back
    return None
'''

# Swaps a returned list's items for always-equal objects a few collections after it was returned:
# the old harness checked the value, then compared it, and a collection in between won.
GC_SWAP = '''
import gc
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __hash__ = object.__hash__
pending, fires, calls = [], [0], [0]
def swap(phase, info):
    if phase == "start":
        fires[0] += 1
        for items, at in pending:
            if fires[0] == at:
                items[:] = [Anything() for _ in items]
gc.callbacks.append(swap)
gc.set_threshold(1, 1, 1)
def triple():
    calls[0] += 1
    items = [0, 0, 0]
    pending.append((items, fires[0] + calls[0]))
    return items
'''

ATTACKS = {
    "own memory through /proc/self/mem after chdir": OWN_MEMORY,
    "every process in /proc": EVERY_PROCESS,
    "a _posixsubprocess.fork_exec child reading its parent's memory": FORK_EXEC_CHILD,
    "a handler of a rebuilt _signal module walking frames": SIGNAL_FRAMES,
    "gc.get_objects and frames": GC_OBJECTS,
}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_no_expected_value_is_reachable_from_the_solution(attack):
    # each attack returns the expected value if it finds it anywhere it can reach, and prints a pass tag for
    # every 64-hex-digit string (the old harness's nonce); with the tests out of its process it finds neither
    marker = "EXPECTED-" + uuid.uuid4().hex
    tests = [f"assert secret() == {marker!r}"] * 2
    assert score(attack, tests) == 0.0


def test_values_swapped_after_they_were_returned_score_zero():
    # a gc callback replaces the returned list's items with always-equal objects some collections later; against
    # the old harness one of the 30 delays landed between its check and its `==`
    assert score(GC_SWAP, ["assert triple() == [1, 2, 3]"] * 30) == 0.0


def test_killing_every_process_it_can_scores_zero():
    trick = "import os, signal\ndef add(a, b):\n    os.kill(-1, signal.SIGKILL)\n    return 0\n"
    assert score(trick) == 0.0
    assert score("def add(a, b):\n    return a + b") == 1.0  # and the next row is scored as usual


def test_a_machine_without_namespaces_is_named_in_a_warning(monkeypatch, caplog):
    import posttrain.rewards.code as code

    monkeypatch.setattr(code, "probe_isolation", lambda: ("audit-network-guard",))
    code._warn_without_namespaces.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="posttrain.rewards"):
            assert score(RIGHT) == 1.0
    finally:
        code._warn_without_namespaces.cache_clear()
    assert "no PID namespace here" in caplog.text


# ---------------------------------------------------------------------------------------------
# Hostile batches (issue #21 item 4)

LOOP = "def add(a, b):\n    while True:\n        pass\n"
RIGHT = "def add(a, b):\n    return a + b\n"


def test_looping_rows_score_zero_alone_and_do_not_stop_the_run():
    # 7 looping completions among 16 (the case, at a smaller scale: the call gets 8 s, a run 3 s). Before,
    # the call passed its timeout_s, all 16 rows failed and RewardFailureError stopped the run
    completions = [LOOP if i % 16 in (0, 2, 3, 5, 8, 11, 15) else RIGHT for i in range(16)]
    rewards = RewardSet.from_specs([RewardSpec("code_tests", timeout_s=8.0,
                                               args={"wall_time_s": 3.0, "first_pass_s": 1.0})])
    before = sandbox_processes()
    result = rewards.score(["p"] * 16, completions, [[0]] * 16, {"tests": [TESTS] * 16})
    assert result.per_reward["code_tests"].tolist() == [0.0 if c is LOOP else 1.0 for c in completions]
    assert result.failures == {"code_tests": 0}
    assert wait_for_no_new_processes(before) == []


def test_looping_rows_first_in_the_batch_do_not_starve_the_rest():
    # one worker, loopers first: every row gets its first pass before any row's second
    completions = [LOOP] * 4 + [RIGHT] * 3
    # in row order the loopers' 4 x (1.5 + 3) s would use up the 10 s budget before the first right row ran
    scores = code_tests_reward(["p"] * 7, completions, tests=[TESTS] * 7, wall_time_s=3.0, first_pass_s=1.5,
                               time_budget_s=10.0, concurrency=1)
    assert scores == [0.0] * 4 + [1.0] * 3


def test_the_time_budget_bounds_the_whole_call():
    before, started = sandbox_processes(), time.monotonic()
    scores = code_tests_reward(["p"] * 4, [LOOP] * 3 + [RIGHT], tests=[TESTS] * 4, wall_time_s=60.0,
                               first_pass_s=1.0, time_budget_s=6.0, concurrency=2)
    elapsed = time.monotonic() - started
    assert scores == [0.0, 0.0, 0.0, 1.0]
    assert elapsed < 6.0 + 10.0  # the budget plus generous room for a loaded machine; it was 60 s per looper
    assert wait_for_no_new_processes(before) == []


def test_an_abandoned_call_kills_its_sandboxes(monkeypatch):
    # The reward keeps within its call's deadline; here it is made to overrun it (as a loaded machine could):
    # the RewardSet gives up at 3 s and sets the call's cancel event, and the sandboxes end then, not when the
    # loopers' 60 s are up
    import posttrain.rewards.code

    monkeypatch.setattr(posttrain.rewards.code, "CALL_MARGIN_S", -60.0)
    rewards = RewardSet.from_specs([RewardSpec("code_tests", timeout_s=3.0,
                                               args={"wall_time_s": 60.0, "first_pass_s": 60.0})],
                               max_failure_fraction=1.0)
    before = sandbox_processes()
    result = rewards.score(["p"] * 2, [LOOP] * 2, [[0]] * 2, {"tests": [TESTS] * 2})
    assert result.failures == {"code_tests": 2}  # the call itself timed out
    assert wait_for_no_new_processes(before, seconds=10.0) == []
