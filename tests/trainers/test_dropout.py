"""Dropout is off by default (`model.disable_dropout: true`): on a GPT-2 model with dropout 0.1 the first RL step's
policy log-probs equal the sampler's, and DPO's implicit rewards are zero before any update."""

from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from posttrain.api import pref, rl
from posttrain.tasks import build_builtin_tokenizer

TASK = {"name": "arithmetic", "digits": 1, "operators": "+-", "train_size": 64, "eval_size": 8}


@pytest.fixture(scope="module")
def gpt2_with_dropout(tmp_path_factory: pytest.TempPathFactory) -> str:
    tokenizer = build_builtin_tokenizer("arithmetic")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    out = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("disable", [True, False])
def test_the_first_rl_step_trains_on_the_sampled_log_probs(gpt2_with_dropout: str, tmp_path: Path,
                                                            disable: bool) -> None:  # fmt: skip
    config = {
        "model": {"path": gpt2_with_dropout, "disable_dropout": disable},
        "data": {"task": TASK, "max_length": 16},
        "train": {"max_steps": 1, "lr": 1e-4},
        "rl": {"prompts_per_step": 4, "group_size": 4, "sampling": {"max_new_tokens": 4},
               "kl": {"coef": 0.1, "estimator": "k3"}},
        "output_dir": str(tmp_path),
    }  # fmt: skip
    first = rl(config, progress=False).history[0]
    if disable:  # the policy is the sampler and the reference: only float rounding between them
        assert first["sampler_logp_gap"] < 1e-5 and abs(first["kl"]) < 1e-6
    else:  # dropout 0.1 on: the training forward is another function than the sampler's
        assert first["sampler_logp_gap"] > 1e-3


def test_dpo_implicit_rewards_are_zero_before_any_update(gpt2_with_dropout: str, tmp_path: Path) -> None:
    config = {
        "model": {"path": gpt2_with_dropout},
        "data": {"task": {**TASK, "kind": "preference"}, "max_length": 16},
        "train": {"max_steps": 1, "batch_size": 8},
        "pref": {"loss": "dpo", "reference": "on_the_fly"},
        "output_dir": str(tmp_path),
    }
    first = pref(config, progress=False).history[0]
    # the step's forward is before its update: policy == reference, so every implicit reward is 0, loss log 2
    assert abs(first["reward_chosen"]) < 1e-6 and abs(first["reward_rejected"]) < 1e-6
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
