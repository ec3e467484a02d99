"""Tools and parsers: schemas from signatures, the built-in tools, every parser, and hostile calls that must become
counted error observations, never a crash."""

import time

import pytest
from tests.envs.scripted import NoModel, TurnScript
from tests.envs.tokenizers import family_tokenizer

from posttrain.data.encoding import PromptTokens
from posttrain.envs import sample_episodes
from posttrain.envs.builtin_tools import Corpus, calculator, make_python, make_search
from posttrain.envs.parsers import TOOL_PARSERS, ToolCall, get_parser
from posttrain.envs.tool_env import ToolEnv
from posttrain.envs.tools import Tool, ToolSet
from posttrain.rollout import SamplingParams


def test_a_schema_comes_from_the_signature_and_docstring():
    def add(a: int, b: int = 0) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        return a + b

    schema = Tool.from_function(add).schema
    assert schema == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "The first."},
                                                        "b": {"type": "integer", "description": "The second."}},
                       "required": ["a"]},
        "return": {"type": "integer"}}}  # fmt: skip


def test_the_calculator_is_exact_and_refuses_anything_but_arithmetic():
    assert calculator("37*58") == "2146"  # 37 * 58 = 2146
    assert calculator("(2+3)**2 - 7//2") == "22"  # 25 - 3
    assert calculator("1/4") == "0.25" and calculator("6/3") == "2"
    assert calculator("123456789*987654321") == "121932631112635269"
    for hostile in ["__import__('os').system('true')", "2**10**9", "1/0", "a+1", "9" * 5000 + "**2"]:
        with pytest.raises(ValueError):
            calculator(hostile)


def test_search_ranks_by_bm25_and_says_when_nothing_matches(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("Paris is the capital of France.\nBerlin is the capital of Germany.\n\nCats purr.\n")
    assert len(Corpus.from_source(corpus).passages) == 3
    search = make_search(str(corpus), k=1)
    assert search.fn(query="capital of Germany") == "Berlin is the capital of Germany."
    assert search.fn(query="quantum") == "no passage matches the query"


def test_python_runs_in_the_sandbox():
    python = make_python(timeout_s=10)
    assert ToolSet([python]).run([ToolCall("python", {"code": "print(6*7)"})])[0].content.strip() == "42"
    failed = ToolSet([python]).run([ToolCall("python", {"code": "raise SystemExit(3)"})])[0]
    assert failed.error == "raised"


@pytest.mark.parametrize(("parser", "text", "calls", "content"), [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
               '<tool_call>{"name": "g", "arguments": "{\\"y\\": 2}"}</tool_call>', [("f", {"x": 1}), ("g", {"y": 2})],
     "Sure."),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}',
     [("f", {"x": 1}), ("g", {})], ""),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}', [("f", {"x": 1})], ""),
    ("llama3_json", "The answer is 4.", [], "The answer is 4."),
    ("mistral", 'Let me. [TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]',
     [("f", {"x": 1}), ("g", {})], "Let me."),
])  # fmt: skip
def test_each_parser_reads_its_format(parser, text, calls, content):
    turn = get_parser(parser)(text)
    assert [(c.name, c.arguments) for c in turn.calls] == calls
    assert turn.content == content and turn.errors == []


@pytest.mark.parametrize(("parser", "text", "error"), [
    ("hermes", "<tool_call>{not json}</tool_call>", "not JSON"),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}', "unclosed"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ("llama3_json", '{"name": "f", "parameters": ', "not JSON"),
    ("mistral", "[TOOL_CALLS] [{", "not JSON"),
])  # fmt: skip
def test_a_malformed_call_is_an_error_not_an_exception(parser, text, error):
    turn = TOOL_PARSERS[parser](text)
    assert turn.calls == [] and len(turn.errors) == 1 and error in turn.errors[0]


def test_hostile_tools_give_counted_error_observations_and_do_not_serialise():
    def boom(x: int) -> str:
        """Raise.

        Args:
            x: Ignored.
        """
        raise RuntimeError("kaboom")

    def hang(x: int) -> str:
        """Sleep forever.

        Args:
            x: Ignored.
        """
        time.sleep(60)
        return "late"

    def huge(x: int) -> str:
        """A long answer.

        Args:
            x: Its length.
        """
        return "y" * x

    tools = ToolSet([Tool.from_function(boom), Tool.from_function(hang, timeout_s=0.5),
                     Tool.from_function(huge, max_output_chars=10)])  # fmt: skip
    calls = [ToolCall("boom", {"x": 1}), ToolCall("hang", {"x": 1}), ToolCall("hang", {"x": 2}),
             ToolCall("huge", {"x": 10_000}), ToolCall("nope", {}), ToolCall("huge", {"z": 1})]  # fmt: skip
    started = time.monotonic()
    results = tools.run(calls)
    elapsed = time.monotonic() - started
    assert [r.error for r in results] == ["raised", "timeout", "timeout", "too_long", "unknown_tool", "bad_arguments"]
    assert results[0].content == "error: RuntimeError: kaboom"
    assert results[3].content.startswith("yyyyyyyyyy... [cut: 10000 characters, the limit is 10]")
    assert "no tool named 'nope'; tools: boom, hang, huge" in results[4].content
    assert "takes no argument z" in results[5].content
    assert elapsed < 30  # the two hanging calls waited side by side, and nothing waited for their 60 s


def test_an_episode_answers_bad_calls_with_errors_and_counts_them():
    tok = family_tokenizer("qwen2_5")
    texts = ['<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
             '<tool_call>{"name": "weather", "arguments": {}}</tool_call><tool_call>{oops}</tool_call>',
             '<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>' * 3,
             "4"]  # fmt: skip
    engine = TurnScript(tok, texts)
    prompts = [PromptTokens([0], "row 1", {}, [{"role": "user", "content": "2+2?"}])]
    out = sample_episodes(engine, NoModel(), prompts, SamplingParams(max_new_tokens=64), n=1, generator=None,
                          tokenizer=tok, environment=lambda: ToolEnv(tok, ["calculator"], max_tool_calls=2))
    info = out.infos[0]
    # turn 1: a division by zero (raised), an unknown tool, a malformed call; turn 2: 3 calls, 2 run, 1 refused
    assert info["tool_calls"] == 2 + 2
    assert {k: v for k, v in info.items() if k.startswith("tool_errors/")} == {
        "tool_errors/raised": 1, "tool_errors/unknown_tool": 1, "tool_errors/malformed": 1,
        "tool_errors/too_many_calls": 1}  # fmt: skip
    assert info["tool_errors"] == 4 and info["answered"] == 1
    replies = [m["content"] for m in info["messages"] if m["role"] == "tool"]
    assert replies[0] == "error: ValueError: division by zero" and replies[3:5] == ["4", "4"]
    assert out.stats["episodes/tool_errors"] == 4
