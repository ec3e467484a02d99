"""Rollouts containers, the padded training layout and stop detection."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from posttrain.rollout import ENGINES, Rollouts, SamplingParams, StopChecker


def two_by_two() -> Rollouts:
    """P=2 prompts x G=2; completion 2 has an environment token (id 99) between model tokens."""
    return Rollouts(
        prompt_ids=[[1, 2], [3]],
        completion_ids=[[10, 11], [12], [13, 99, 14], [15]],
        logprobs=[
            torch.tensor([-0.1, -0.2]),
            torch.tensor([-0.3]),
            torch.tensor([-0.4, 0.0, -0.5]),
            torch.tensor([-0.6]),
        ],
        finish_reasons=["stop", "length", "stop", "length"],
        group_size=2,
        model_token_mask=[
            torch.tensor([True, True]),
            torch.tensor([True]),
            torch.tensor([True, False, True]),
            torch.tensor([True]),
        ],
    )


def test_to_padded_aligns_masks_and_logprobs_with_tokens():
    padded = two_by_two().to_padded(pad_id=0)
    # rows: [1 2 10 11] [1 2 12 .] [3 13 99 14] [3 15 . .]
    assert padded.input_ids_B_T.tolist() == [[1, 2, 10, 11], [1, 2, 12, 0], [3, 13, 99, 14], [3, 15, 0, 0]]
    assert padded.attention_mask_B_T.int().tolist() == [
        [1, 1, 1, 1],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 1, 0, 0],
    ]
    # column t is about token t: row 0's completion tokens sit at columns 2, 3; row 2's env token 99 is masked
    assert padded.loss_mask_B_T.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 0]]
    expected_logp = [[0, 0, -0.1, -0.2], [0, 0, -0.3, 0], [0, -0.4, 0, -0.5], [0, -0.6, 0, 0]]
    torch.testing.assert_close(padded.old_logp_B_T, torch.tensor(expected_logp))
    assert padded.prompt_lengths_B.tolist() == [2, 2, 1, 1]


def test_num_model_tokens_skips_environment_tokens():
    assert two_by_two().num_model_tokens == 6  # 7 completion tokens, one from the environment


def test_rollouts_reject_wrong_lengths():
    with pytest.raises(ValueError, match="finish_reasons has 1 entries; expected P\\*G = 2"):
        Rollouts(
            prompt_ids=[[1]],
            completion_ids=[[2], [3]],
            logprobs=[torch.zeros(1)] * 2,
            finish_reasons=["stop"],
            group_size=2,
        )


def test_stop_checker_finds_strings_spanning_tokens(char_tokenizer):
    # ids 1..5 decode to "1".."5"; stop string "34" is completed by the token "4"
    stop = StopChecker(
        SamplingParams(max_new_tokens=8, stop_strings=("34",), stop_token_ids=(9,)), char_tokenizer
    )
    assert not stop.is_stop([1, 2, 3])
    assert stop.is_stop([1, 2, 3, 4])
    assert not stop.is_stop([3, 4, 5])  # matched one token earlier, not ended by "5"
    assert stop.first_stop([1, 3, 4, 5, 9]) == 2
    assert stop.first_stop([1, 2, 9, 3, 4]) == 2
    assert stop.first_stop([1, 2]) is None


def test_stop_strings_need_a_tokenizer(qwen2_model):
    params = SamplingParams(max_new_tokens=2, stop_strings=("x",))
    for engine in (ENGINES[name] for name in ENGINES.installed()):
        with pytest.raises(ValueError, match="needs a tokenizer"):
            engine.generate(qwen2_model, [[1]], params, n=1)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_is_listed_without_its_package_and_choosing_it_says_how_to_install():
    from posttrain.api import registered
    from posttrain.config.rl import RLSection

    assert "vllm" in registered()["engines"]
    with pytest.raises(ValueError, match=r"rl.engine: 'vllm' needs vLLM.*make vllm-venv"):
        RLSection(engine="vllm")
    with pytest.raises(ImportError, match="make vllm-venv"):
        ENGINES["vllm"]
    assert "vllm" not in sys.modules


def test_engine_args_must_be_the_engines_own():
    from posttrain.config.rl import RLSection

    with pytest.raises(ValueError, match=r"rl.engine_args: \['beam'\] are not arguments of engine 'native'"):
        RLSection(engine="native", engine_args={"beam": 4})


DEFAULT_RUN = """
import sys
from posttrain.api import rl
config = {
    "model": {"preset": "qwen2-small", "tokenizer": "arithmetic"},
    "data": {"task": {"name": "arithmetic", "digits": 1, "operators": "+", "train_size": 8, "eval_size": 2},
             "max_length": 16},
    "train": {"max_steps": 1},
    "eval": {"max_new_tokens": 2, "limit": 2},
    "rl": {"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 4}},
    "output_dir": sys.argv[1],
}
rl(config, progress=False)
loaded = sorted(m for m in sys.modules if m == "vllm" or m.startswith(("vllm.", "posttrain.rollout.vllm")))
print("LOADED", loaded)
"""


def test_a_default_rl_run_never_imports_vllm(tmp_path):
    # a fresh process, so that the answer holds whether or not vLLM is installed (it is in .venv-vllm)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DEFAULT_RUN, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout.splitlines()
