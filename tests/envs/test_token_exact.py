"""Ids trained are ids sampled, over four published chat templates, with scripted policies through every built-in
environment: each model turn is trained after exactly the context it was sampled in, environment tokens are masked,
and where a template re-renders history (Mistral's call ids, Qwen3's dropped thinking) the episode is split and
counted instead."""

import pytest
import torch
from tests.envs.scripted import NoModel, TurnScript
from tests.envs.tokenizers import family_tokenizer

from posttrain.data.encoding import PromptTokens
from posttrain.envs import sample_episodes
from posttrain.envs.games import GuessNumberEnv
from posttrain.envs.tool_env import CalculatorEnv
from posttrain.rollout import SamplingParams

PARAMS = SamplingParams(max_new_tokens=64, temperature=1.0)
QUESTION = [{"role": "user", "content": "What is 12*34?"}]
CALL = {
    "qwen2_5": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>',
    "qwen3": '<think>\nI need the calculator.\n</think>\n\n'
             '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>',
    "llama3_1": '{"name": "calculator", "parameters": {"expression": "12*34"}}',
    "mistral": '[TOOL_CALLS] [{"name": "calculator", "arguments": {"expression": "12*34"}}]',
}
ANSWER = {"qwen2_5": "The answer is 408.", "qwen3": "<think>\nThe tool said 408.\n</think>\n\nThe answer is 408.",
          "llama3_1": "The answer is 408.", "mistral": " The answer is 408."}
PARSER = {"qwen2_5": "hermes", "qwen3": "hermes", "llama3_1": "llama3_json", "mistral": "mistral"}


def assert_trained_as_sampled(rollouts, engine, pad_id):
    """Every model turn sits in one training row right after the exact context it was sampled in, masked True, and
    the rows train nothing else."""
    rows, _ = rollouts.to_training_rows(pad_id)
    ids, mask = rows.input_ids_B_T.tolist(), rows.loss_mask_B_T
    for context, sampled in zip(engine.calls, engine.sampled):
        hits = [b for b in range(len(ids)) if ids[b][: len(context) + len(sampled)] == context + sampled]
        assert len(hits) == 1, "a turn must be trained after exactly the context it was sampled in"
        assert mask[hits[0], len(context) : len(context) + len(sampled)].all()
    assert int(mask.sum()) == sum(len(s) for s in engine.sampled)
    torch.testing.assert_close(rows.old_logp_B_T[mask], torch.full((int(mask.sum()),), -1.0))


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3_1", "mistral"])
def test_a_calculator_episode_is_token_exact_under_each_template(family):
    tok = family_tokenizer(family)
    engine = TurnScript(tok, [CALL[family], ANSWER[family]])
    prompts = [PromptTokens([0], "row 1", {"answer": "408"}, QUESTION)]
    out = sample_episodes(engine, NoModel(), prompts, PARAMS, n=1, generator=None, tokenizer=tok,
                          environment=lambda: CalculatorEnv(tok, parser=PARSER[family]))
    info = out.infos[0]
    assert info["tool_calls"] == 1 and info["tool_errors"] == 0 and info["answered"] == 1
    messages = info["messages"]
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert messages[0]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "12*34"}}
    assert messages[1]["content"] == "408"
    assert_trained_as_sampled(out, engine, tok.pad_token_id)
    # the second turn was sampled after the template's own rendering of the conversation with its tool result
    rendered = tok(tok.apply_chat_template([*QUESTION, *messages[:2]], tools=[CalculatorEnv(tok).toolset.schemas[0]],
                                           tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]  # fmt: skip
    assert engine.calls[1] == rendered
    if family == "mistral":  # the template writes a call id the model never sampled: split, not drifted
        assert out.stats["episodes/split"] == 1 and info["splits"] == 1
    else:
        assert out.stats["episodes/split"] == 0 and info["splits"] == 0
        # unsplit: the tool result's ids are in the completion, masked, between the two turns
        first, second = engine.sampled
        completion, mask = out.completion_ids[0], out.model_token_mask[0]
        assert completion[: len(first)] == first and completion[-len(second) :] == second
        assert not mask[len(first) : len(completion) - len(second)].any()


def test_qwen3_drops_earlier_thinking_after_a_user_reply_so_the_game_splits():
    tok = family_tokenizer("qwen3")
    texts = ["<think>\nStart in the middle.\n</think>\n\n8", "<think>\nHigher than 8.\n</think>\n\n12",
             "<think>\nLower than 12.\n</think>\n\n10"]
    engine = TurnScript(tok, texts)
    prompts = [PromptTokens([0], "row 1", {"secret": 10}, "Guess my number between 1 and 16.")]
    out = sample_episodes(engine, NoModel(), prompts, PARAMS, n=1, generator=None, tokenizer=tok,
                          environment=lambda: GuessNumberEnv(tok))
    info = out.infos[0]
    assert info["solved"] == 1 and info["guesses"] == 3
    assert [m["content"] for m in info["messages"] if m["role"] == "user"] == ["higher", "lower"]
    assert out.step_rewards == [[(len(out.completion_ids[0]) - 1, 1.0)]]
    # each reply makes the template drop the thinking of the turns before it: two splits, three samples
    assert info["splits"] == 2 and out.stats["episodes/extra_samples"] == 2
    assert "Start in the middle" not in tok.decode(engine.calls[2])
    assert_trained_as_sampled(out, engine, tok.pad_token_id)


def test_chatml_game_is_not_split():
    tok = family_tokenizer("qwen2_5")
    engine = TurnScript(tok, ["8", "12", "10"])
    prompts = [PromptTokens([0], "row 1", {"secret": 10}, "Guess my number between 1 and 16.")]
    out = sample_episodes(engine, NoModel(), prompts, PARAMS, n=1, generator=None, tokenizer=tok,
                          environment=lambda: GuessNumberEnv(tok, max_guesses=5))
    assert out.infos[0]["splits"] == 0 and out.infos[0]["solved"] == 1
    assert_trained_as_sampled(out, engine, tok.pad_token_id)
