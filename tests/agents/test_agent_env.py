"""An agent written against the `openai` client is the episode (`openai_agent`): each call it makes is a model turn
sampled by the run's engine, trained token-exactly (split where the agent rewrote its history), its return value the
episode's reward; an agent that raises, stalls or keeps calling past the limits ends its episode, never the run."""

import json
import threading
from pathlib import Path

import openai
import pytest
import torch
from tests.envs.scripted import NoModel, ScriptedEngine, TurnScript
from tests.envs.tokenizers import family_tokenizer

from posttrain import api
from posttrain.agents import AgentEnv, load_agent
from posttrain.data.encoding import PromptTokens
from posttrain.envs import EpisodeLimits, sample_episodes
from posttrain.envs.builtin_tools import evaluate_arithmetic
from posttrain.envs.registry import EnvironmentLoadError, environment_factory
from posttrain.rollout import SamplingParams

PARAMS = SamplingParams(max_new_tokens=64)
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "The "
                                                                   "expression."}}, "required": ["expression"]}}}
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
ANSWER = "The answer is 408."


def calculator_agent(client, row):
    """A plain tool loop: call the model, run its calculator calls, call again, until it answers."""
    messages = [{"role": "user", "content": row["prompt"]}]
    while True:
        message = client.chat.completions.create(model="posttrain", messages=messages,
                                                 tools=[CALCULATOR]).choices[0].message  # fmt: skip
        messages.append(message)
        if not message.tool_calls:
            return 1.0 if "408" in (message.content or "") else 0.0
        for call in message.tool_calls:
            value = evaluate_arithmetic(json.loads(call.function.arguments)["expression"])
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(value)})


NO_LIMITS = EpisodeLimits()


def play(tok, engine, agent, *, n=1, limits=NO_LIMITS, **args):
    prompts = [PromptTokens([0], "row 1", {"answer": "408"}, "What is 12*34?")]
    envs = []
    out = sample_episodes(engine, NoModel(), prompts, PARAMS, n=n, generator=None, tokenizer=tok,
                          environment=lambda: AgentEnv(tok, agent, **args), limits=limits, envs_out=envs)  # fmt: skip
    return out, envs


def rendered(tok, messages):
    return tok(tok.apply_chat_template(messages, tools=[CALCULATOR], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]  # fmt: skip


def test_every_call_of_the_agent_is_a_model_turn_trained_as_sampled():
    tok = family_tokenizer("qwen2_5")
    engine = TurnScript(tok, [CALL, ANSWER])
    out, (env,) = play(tok, engine, calculator_agent)
    question = [{"role": "user", "content": "What is 12*34?"}]
    first, second = engine.sampled
    # the prompt is the template's rendering of the agent's first call; the observation is what its second call
    # added after the ids sampled: the tool result, rendered by the template
    assert out.prompt_ids == [rendered(tok, question)]
    call = {"type": "function", "id": env.calls[0].message["tool_calls"][0]["id"],
            "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}  # fmt: skip
    history = [*question, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "content": "408"}]  # fmt: skip
    context = rendered(tok, history)
    observation = context[len(out.prompt_ids[0]) + len(first) :]
    assert context[: len(out.prompt_ids[0]) + len(first)] == out.prompt_ids[0] + first
    assert out.completion_ids == [first + observation + second]
    assert engine.calls == [out.prompt_ids[0], context]
    mask = out.model_token_mask[0].tolist()
    assert mask == [True] * len(first) + [False] * len(observation) + [True] * len(second)
    assert out.logprobs[0][~out.model_token_mask[0]].abs().sum() == 0
    assert out.turn_ids[0].tolist() == [0] * len(first) + [-1] * len(observation) + [1] * len(second)
    # the agent's return value is the episode's reward, on its last model token
    assert out.step_rewards == [[(len(out.completion_ids[0]) - 1, 1.0)]]
    info = out.infos[0]
    assert info["calls"] == 2 and info["tool_calls"] == 1 and info["splits"] == 0 and info["answered"] == 1
    assert [m["role"] for m in info["messages"]] == ["assistant", "tool", "assistant"]
    assert info["messages"][-1]["content"] == ANSWER
    assert out.stats["episodes/split"] == 0 and env.result == 1.0


def test_an_agent_that_rewrites_its_history_is_split_not_drifted():
    tok = family_tokenizer("qwen2_5")

    def forgetful(client, row):
        messages = [{"role": "user", "content": row["prompt"]}]
        reply = client.chat.completions.create(model="posttrain", messages=messages, tools=[CALCULATOR])
        # sends back its own summary of the call instead of the message the model wrote
        messages += [{"role": "assistant", "content": "I used the calculator."},
                     {"role": "user", "content": "It said 408."}]  # fmt: skip
        reply = client.chat.completions.create(model="posttrain", messages=messages, tools=[CALCULATOR])
        return None if reply else 0.0

    engine = TurnScript(tok, [CALL, ANSWER])
    out, _ = play(tok, engine, forgetful)
    assert out.stats["episodes/split"] == 1 and out.infos[0]["splits"] == 1
    first, second = engine.sampled
    assert out.segments == [[(len(first), engine.calls[1])]]
    rows, _ = out.to_training_rows(tok.pad_token_id)
    ids, mask = rows.input_ids_B_T.tolist(), rows.loss_mask_B_T
    for b, (context, sampled) in enumerate(zip(engine.calls, engine.sampled)):
        assert ids[b][: len(context) + len(sampled)] == context + sampled
        assert mask[b, len(context) : len(context) + len(sampled)].all()
    assert int(mask.sum()) == len(first) + len(second)
    assert out.step_rewards == []  # the agent returned None: the run's rewards alone score it


def test_an_agent_that_raises_fails_its_own_episode():
    tok = family_tokenizer("qwen2_5")

    def broken(client, row):
        client.chat.completions.create(model="posttrain", messages=[{"role": "user", "content": row["prompt"]}])
        raise KeyError("no such column")

    out, _ = play(tok, TurnScript(tok, [ANSWER]), broken)
    assert out.stats["episodes/failed"] == 1
    assert "KeyError" in out.infos[0]["env_error"] and "no such column" in out.infos[0]["env_error"]


def test_an_agent_still_calling_at_max_turns_is_refused_and_ends():
    tok = family_tokenizer("qwen2_5")
    seen, ended = [], threading.Event()

    def insistent(client, row):
        messages = [{"role": "user", "content": row["prompt"]}]
        try:
            while True:
                messages.append(client.chat.completions.create(model="posttrain", messages=messages).choices[0].message)
                messages.append({"role": "user", "content": "again"})
        except openai.BadRequestError as error:
            seen.append(str(error))
            raise
        finally:
            ended.set()

    out, _ = play(tok, TurnScript(tok, ["a", "b", "c"]), insistent, limits=EpisodeLimits(max_turns=2))
    assert out.stats["episodes/turns"] == 2 and out.finish_reasons == ["length"]
    assert ended.wait(30) and "episode is over" in seen[0]


def test_an_agent_that_stalls_fails_after_timeout():
    tok = family_tokenizer("qwen2_5")
    stop = threading.Event()

    def stalling(client, row):
        client.chat.completions.create(model="posttrain", messages=[{"role": "user", "content": row["prompt"]}])
        stop.wait(30)  # neither calls nor returns

    out, _ = play(tok, TurnScript(tok, [ANSWER]), stalling, timeout_s=0.5)
    stop.set()
    assert out.stats["episodes/failed"] == 1 and "timeout_s=0.5" in out.infos[0]["env_error"]


def test_an_async_agent_and_a_group_of_episodes():
    tok = family_tokenizer("qwen2_5")

    async def answer(client, row):
        reply = await client.chat.completions.create(model="posttrain",
                                                     messages=[{"role": "user", "content": row["prompt"]}])  # fmt: skip
        return float(reply.choices[0].message.content == ANSWER)

    ids = [*tok(ANSWER, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    out, envs = play(tok, ScriptedEngine(lambda context: ids), answer, n=3)
    assert out.group_size == 3 and len(envs) == 3
    assert out.env_rewards() == [1.0, 1.0, 1.0]


def test_an_agent_is_checked_when_the_environment_is_built(tmp_path):
    tok = family_tokenizer("qwen2_5")
    (tmp_path / "agents.py").write_text("def solve(client, row, tries=1):\n    return 0.0\n"
                                        "def needs(client, secret):\n    return 0.0\n")  # fmt: skip
    make = environment_factory("openai_agent", {"agent": "agents.py:solve", "agent_args": {"tries": 2}},
                               tokenizer=tok, base_dir=tmp_path)  # fmt: skip
    assert make().agent.args == {"tries": 2} and make().agent.takes == ("client", "row")
    with pytest.raises(EnvironmentLoadError, match=r"agent_args \['retries'\] are not its parameters"):
        load_agent("agents.py:solve", {"retries": 2}, tmp_path)
    with pytest.raises(EnvironmentLoadError, match=r"needs \['secret'\]"):
        load_agent("agents.py:needs", None, tmp_path)
    with pytest.raises(EnvironmentLoadError, match=r"env.args.agent: .*missing\.py.* not found"):
        load_agent("missing.py:solve", None, tmp_path)
    with pytest.raises(EnvironmentLoadError, match="has no attribute 'other'"):
        load_agent("agents.py:other", None, tmp_path)


def test_an_agent_that_returns_before_calling_the_model_is_named():
    tok = family_tokenizer("qwen2_5")
    with pytest.raises(Exception, match="returned before calling the model"):
        play(tok, TurnScript(tok, []), lambda row: 1.0)


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def parity(prompts, completions, **kwargs):
    """A reward that differs within groups, so that GRPO updates: the final message's length, odd or even."""
    return [float(len(messages[-1]["content"] or "") % 2) for messages in completions]


def test_a_grpo_run_through_the_recipes_agent(tmp_path):
    """recipes/agents/calculator_agent.py, the agent of recipes/arith-tools-agent.yaml, trained for two steps."""
    task = {"name": "arithmetic", "digits": 2, "operators": "*", "train_size": 32, "eval_size": 4,
            "tool_fraction": 0.5}  # fmt: skip
    sft = api.sft({"model": {"preset": "qwen2-tiny", "tokenizer": "arithmetic-tools"},
                   "data": {"task": task, "max_length": 96}, "train": {"max_steps": 2, "batch_size": 8},
                   "eval": {"limit": 2}, "output_dir": str(tmp_path / "sft")}, progress=False)  # fmt: skip
    before = {k: v.clone() for k, v in sft.model.state_dict().items()}
    result = api.rl({"model": {"path": str(sft.final_dir)}, "data": {"task": task, "max_length": 96},
                     "train": {"max_steps": 2, "lr": 1e-2}, "eval": {"limit": 2, "max_new_tokens": 16},
                     "env": {"name": "openai_agent", "max_turns": 3,
                             "args": {"agent": str(RECIPES / "agents/calculator_agent.py:solve"),
                                      "agent_args": {"max_calls": 2}}},
                     "rl": {"prompts_per_step": 2, "group_size": 4, "sampling": {"max_new_tokens": 16}},
                     "output_dir": str(tmp_path / "rl")}, rewards=[parity], progress=False)  # fmt: skip
    steps = [h for h in result.history if "episodes/count" in h]
    assert len(steps) == 2
    for step in steps:
        assert step["episodes/count"] == 8 and step["episodes/calls"] >= 1 and step["episodes/failed"] == 0
        assert step["episodes/turns"] == step["episodes/calls"]  # every call was one model turn
    assert "eval_calls" in result.final_eval
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
