"""The OpenAI-compatible endpoint, called with the real `openai` client on 127.0.0.1: requests rendered with the chat
template (tools included), responses in OpenAI's format with the tool calls the parser reads, every call recorded as
the ids and log-probs the engine sampled."""

import json
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
from tests.envs.scripted import NoModel, TurnScript
from tests.envs.tokenizers import family_tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.agents import ChatEndpoint, RequestError, parse_request, serve
from posttrain.agents.serve import BatchSampler
from posttrain.rollout import ENGINES, Rollouts, SamplingParams

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "The "
                                                                   "expression."}}, "required": ["expression"]}}}
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
QUESTION = [{"role": "user", "content": "What is 12*34?"}]


def rendered(tok, messages, tools=None):
    return tok(tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]  # fmt: skip


def client_of(endpoint):
    return openai.OpenAI(base_url=endpoint.base_url, api_key="none", max_retries=0)


def test_requests_become_the_messages_chat_templates_take():
    request = parse_request({
        "model": "m", "temperature": 0.5, "max_tokens": 7, "stop": "\n",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "12*"}, {"type": "text", "text": "34?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abc", "type": "function", "function": {"name": "calculator",
                                                               "arguments": '{"expression": "12*34"}'}}]},
            {"role": "tool", "tool_call_id": "abc", "content": "408"},
        ],
    })  # fmt: skip
    assert request.messages == [
        {"role": "user", "content": "12*34?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "abc",
             "function": {"name": "calculator", "arguments": {"expression": "12*34"}}}]},
        {"role": "tool", "content": "408", "tool_call_id": "abc"},
    ]  # fmt: skip
    assert request.sampling == {"temperature": 0.5, "max_tokens": 7, "stop": ("\n",)}


@pytest.mark.parametrize(("body", "names"), [
    ({"messages": QUESTION, "stream": True}, "stream"),
    ({"messages": QUESTION, "n": 2}, "n:"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
])  # fmt: skip
def test_a_request_it_cannot_serve_names_the_field(body, names):
    with pytest.raises(RequestError, match=f"^{names}".replace("[", r"\[").replace("]", r"\]")) as caught:
        parse_request(body)
    assert caught.value.status == 400


def test_two_calls_with_a_tool_call_through_the_openai_client():
    tok = family_tokenizer("qwen2_5")
    engine = TurnScript(tok, [CALL, "The answer is 408."])
    with ChatEndpoint(NoModel(), tok, engine=engine, max_new_tokens=64) as endpoint:
        client = client_of(endpoint)
        assert [m.id for m in client.models.list()] == ["posttrain"]
        messages = list(QUESTION)
        first = client.chat.completions.create(model="posttrain", messages=messages, tools=[CALCULATOR])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "12*34"}
        messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "408"}]
        second = client.chat.completions.create(model="posttrain", messages=messages, tools=[CALCULATOR])
        assert second.choices[0].message.content == "The answer is 408."
        assert second.choices[0].finish_reason == "stop"
        calls = endpoint.calls

    # the prompts are the template's renderings with the tools; the completions are what the engine sampled
    assert calls[0].prompt_ids == engine.calls[0] == rendered(tok, QUESTION, [CALCULATOR])
    assert [c.completion_ids for c in calls] == engine.sampled
    assert calls[1].prompt_ids == engine.calls[1]
    # the echoed assistant message renders back to the ids sampled: the second prompt extends the first call's ids
    assert calls[1].prompt_ids[: len(calls[0].prompt_ids) + len(engine.sampled[0])] == \
        calls[0].prompt_ids + engine.sampled[0]  # fmt: skip
    assert first.usage.prompt_tokens == len(engine.calls[0]) and first.usage.completion_tokens == len(engine.sampled[0])
    assert first.model_extra["prompt_token_ids"] == engine.calls[0]
    assert choice.model_extra["token_ids"] == engine.sampled[0]


class Spy:
    """The native engine, with every call's output kept."""

    def __init__(self):
        self.outputs = []

    def generate(self, model, prompt_ids, params, **kwargs):
        out = ENGINES["native"].generate(model, prompt_ids, params, **kwargs)
        self.outputs.append(out)
        return out


def test_recorded_logprobs_are_the_models_own():
    tok = family_tokenizer("qwen2_5")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    model = Qwen2ForCausalLM(config).eval()
    spy = Spy()
    with ChatEndpoint(model, tok, engine=spy, max_new_tokens=6) as endpoint:
        reply = client_of(endpoint).chat.completions.create(model="posttrain", messages=QUESTION, logprobs=True,
                                                            temperature=1.0)  # fmt: skip
        (call,) = endpoint.calls
    (sampled,) = spy.outputs
    assert call.completion_ids == sampled.completion_ids[0] == reply.choices[0].model_extra["token_ids"]
    assert len(call.completion_ids) == 6 and reply.choices[0].finish_reason == "length"
    # an independent forward over prompt + completion: log_softmax at each position, the next token picked
    ids = torch.tensor([call.prompt_ids + call.completion_ids])
    with torch.no_grad():
        logp_T_V = model(ids).logits[0].log_softmax(-1)
    start = len(call.prompt_ids)
    expected = [logp_T_V[start - 1 + k, token].item() for k, token in enumerate(call.completion_ids)]
    assert call.logprobs == pytest.approx(expected, abs=1e-4)
    assert [t.logprob for t in reply.choices[0].logprobs.content] == pytest.approx(call.logprobs, abs=1e-6)


def test_calls_that_wait_together_are_sampled_in_one_engine_call():
    release = threading.Event()

    class Blocking:
        def __init__(self):
            self.batches = []

        def generate(self, model, prompt_ids, params, *, n, generator=None, tokenizer=None):
            self.batches.append([list(p) for p in prompt_ids])
            if len(self.batches) == 1:
                release.wait(30)
            return Rollouts([list(p) for p in prompt_ids], [[7] for _ in prompt_ids],
                            [torch.zeros(1) for _ in prompt_ids], ["stop"] * len(prompt_ids), group_size=1)  # fmt: skip

    engine = Blocking()
    sampler = BatchSampler(engine, NoModel(), None)
    params = SamplingParams(max_new_tokens=1)
    threads = [threading.Thread(target=sampler.sample, args=([k], params)) for k in range(4)]
    threads[0].start()
    while not engine.batches:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    while sampler.queue.qsize() < 3:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(30)
    sampler.close()
    assert engine.batches[0] == [[0]]
    assert sorted(engine.batches[1]) == [[1], [2], [3]] and len(engine.batches) == 2


def test_a_request_the_endpoint_cannot_serve_is_a_client_error_not_retried():
    tok = family_tokenizer("qwen2_5")
    engine = TurnScript(tok, ["x"])
    with ChatEndpoint(NoModel(), tok, engine=engine, max_new_tokens=4) as endpoint:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="none", max_retries=2)
        with pytest.raises(openai.BadRequestError, match="stream"):
            client.chat.completions.create(model="posttrain", messages=QUESTION, stream=True)
        with pytest.raises(openai.BadRequestError, match="top_p"):
            client.chat.completions.create(model="posttrain", messages=QUESTION, top_p=0.0)
        wrong = openai.OpenAI(base_url=endpoint.base_url.replace("/v1", "/s/nope/v1"), api_key="none", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            wrong.chat.completions.create(model="posttrain", messages=QUESTION)
        assert engine.calls == []  # nothing was sampled for any of them


def test_posttrain_serve_serves_a_model_directory(tmp_path):
    tok = family_tokenizer("qwen2_5")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32)).save_pretrained(tmp_path)  # fmt: skip
    tok.save_pretrained(tmp_path)
    records = tmp_path / "calls.jsonl"
    command = [sys.executable, "-m", "posttrain", "serve", str(tmp_path), "--port", "0", "--max-new-tokens", "3",
               "--record", str(records)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "http://127.0.0.1:" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "posttrain serve exited before serving"
        base_url = line[line.index("http://") :].split()[0]
        reply = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0).chat.completions.create(
            model="posttrain", messages=QUESTION, temperature=0.0)
        assert reply.usage.completion_tokens == len(reply.choices[0].model_extra["token_ids"]) <= 3
    finally:
        process.terminate()
        process.wait(30)
    (record,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert record["completion_ids"] == reply.choices[0].model_extra["token_ids"]
    assert record["prompt_ids"] == rendered(tok, QUESTION) and len(record["logprobs"]) == len(record["completion_ids"])


def test_serve_loads_a_directory_and_its_tokenizer(tmp_path):
    tok = family_tokenizer("qwen2_5")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32)).save_pretrained(tmp_path)  # fmt: skip
    tok.save_pretrained(tmp_path)
    with serve(tmp_path, max_new_tokens=2, temperature=0.0) as endpoint:
        assert endpoint.base_url.startswith("http://127.0.0.1:")
        client_of(endpoint).chat.completions.create(model="any", messages=QUESTION)
        assert endpoint.calls[0].prompt_ids == rendered(tok, QUESTION)
