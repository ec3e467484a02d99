"""The calculator agent end to end on CPU: tool-use rows from the task, the tools tokenizer through AutoTokenizer,
an SFT warm start and a GRPO step in the calculator environment, its episode metrics logged."""

from transformers import AutoTokenizer

from posttrain import api
from posttrain.data.encoding import encode_sft_example
from posttrain.data.examples import validate_sft_row
from posttrain.data.readers import Row
from posttrain.tasks import ArithmeticTask, build_builtin_tokenizer


def test_the_tools_tokenizer_round_trips_and_renders_a_demonstration(tmp_path):
    tok = build_builtin_tokenizer("arithmetic-tools")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rows = ArithmeticTask(digits=3, operators="*", tool_fraction=1.0).sample(3, seed=0)
    for r in rows:
        a = encode_sft_example(tok, validate_sft_row(Row(r, "x")))
        b = encode_sft_example(loaded, validate_sft_row(Row(r, "x")))
        assert a == b
    text = tok.decode(encode_sft_example(tok, validate_sft_row(Row(rows[0], "x"))).input_ids)
    expression = rows[0]["prompt"][0]["content"].rstrip("=")
    assert f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>' in text


def test_a_grpo_step_in_the_calculator_environment(tmp_path):
    task = {"name": "arithmetic", "digits": 2, "operators": "*", "train_size": 64, "eval_size": 8,
            "tool_fraction": 0.5}  # fmt: skip
    sft = api.sft({"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic-tools"},
                   "data": {"task": task, "max_length": 96}, "train": {"max_steps": 2, "batch_size": 8},
                   "eval": {"limit": 4}, "output_dir": str(tmp_path / "sft")}, progress=False)  # fmt: skip
    result = api.rl({"model": {"path": str(sft.final_dir)}, "data": {"task": task, "max_length": 96},
                     "train": {"max_steps": 2}, "eval": {"limit": 4, "max_new_tokens": 24},
                     "env": {"name": "calculator", "max_turns": 3},
                     "rl": {"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 24}},
                     "output_dir": str(tmp_path / "rl")}, progress=False)  # fmt: skip
    step = result.history[-1]
    assert step["episodes/count"] == 4 and step["episodes/turns"] >= 1
    assert {"time/gen_s", "time/env_s", "train_s", "episodes/truncated", "episodes/split"} <= set(step)
    assert "eval_turns" in result.final_eval or "eval_accuracy" in result.final_eval
