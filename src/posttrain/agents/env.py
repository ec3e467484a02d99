"""Bring your own agent: a function written against the `openai` client is the episode, and every chat-completions
call it makes is a model turn of the episode, sampled by the run's engine and trained token-exactly.

    # my_agent.py
    def solve(client, row):
        messages = [{"role": "user", "content": row["prompt"]}]
        reply = client.chat.completions.create(model="posttrain", messages=messages, tools=TOOLS).choices[0].message
        ...                                  # run its tool calls, append the results, call again, ...
        return 1.0 if right else 0.0         # the episode's reward (None: the run's rewards alone score it)

    env: {name: openai_agent, args: {agent: my_agent.py:solve}}

Each episode opens a session of the process's endpoint (`agents.server`) and runs the agent on a thread with a client
whose `base_url` is that session's. A call's messages (and `tools`) are rendered by the chat template into prompt ids
(`agents.turns`); the episode driver samples the turn with the run's engine and sampling settings, batched with
every other episode's turn (`envs.base.run_episodes`); the agent receives the turn as an OpenAI response, its tool
calls parsed by `parser`. The next call's prompt ids are checked to extend the ids so far (the previous prompt and
the ids sampled): the new ids are the observation, masked out of the loss, or, when the agent or the template
rewrote the history, the call's prompt is the next turn's whole context and the episode is split there into another
training sample (`StepResult.context_ids`, counted in `splits`). So the ids trained are the ids sampled, after
exactly the context they were sampled in.

The agent receives, by the names its signature declares: `client` (an `openai.OpenAI`, or `openai.AsyncOpenAI` for
an `async def` agent, with no retries: a retried call would be a second turn), `base_url`, `row` (the data row's
columns and `prompt`), `model` (the name served), and `agent_args`. A call's sampling fields (temperature,
max_tokens, stop) are not used in training: the run's `rl.sampling` samples every turn, as on-policy training needs;
`logprobs` in the response are null (the episode's Rollouts hold them). An agent that raises, or makes no call and
does not return within `timeout_s`, fails its episode (counted); one still calling when the episode reaches
`env.max_turns` or `env.max_total_tokens` gets an error response (HTTP 400) and its episode ends there, truncated.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.agents.openai_format import ChatRequest, RequestError
from posttrain.agents.server import shared_server
from posttrain.agents.turns import MODEL_NAME, CallRecord, ChatTurns
from posttrain.envs.base import StepResult
from posttrain.envs.registry import EnvironmentLoadError, resolve_environment

AGENT_INPUTS = ("client", "base_url", "row", "model")
"""What an agent function may take by name, besides its `agent_args`."""


class AgentError(RuntimeError):
    """An agent that failed its episode: it raised, returned before calling the model, or stalled."""


@dataclass
class Agent:
    """A user's agent function and the arguments its signature takes."""

    fn: Callable[..., Any]
    name: str
    takes: tuple[str, ...]
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def run(self, base_url: str, row: dict[str, Any], timeout_s: float) -> Any:
        inputs: dict[str, Any] = {"base_url": base_url, "row": row, "model": MODEL_NAME}
        client = None
        if "client" in self.takes:
            import openai

            kind = openai.AsyncOpenAI if self.is_async else openai.OpenAI
            client = inputs["client"] = kind(base_url=base_url, api_key="posttrain", max_retries=0,
                                             timeout=timeout_s)  # fmt: skip
        kwargs = {k: v for k, v in inputs.items() if k in self.takes} | self.args
        if self.is_async:
            return asyncio.run(self._run_async(kwargs, client))
        try:
            return self.fn(**kwargs)
        finally:
            if client is not None:
                client.close()

    async def _run_async(self, kwargs: dict[str, Any], client: Any) -> Any:
        try:
            return await self.fn(**kwargs)
        finally:
            if client is not None:
                await client.close()


def load_agent(spec: str | Callable[..., Any], args: Mapping[str, Any] | None = None,
               base_dir: str | Path | None = None) -> Agent:  # fmt: skip
    """The agent `spec` names (`path/to/file.py:function`, `package.module:function`, or the function itself), its
    signature checked against what it will be given."""
    if isinstance(spec, str):
        try:
            fn = resolve_environment(spec, base_dir) if ":" in spec else None
        except EnvironmentLoadError as err:
            raise EnvironmentLoadError(f"env.args.agent: {err}") from None
        if fn is None:
            raise EnvironmentLoadError(f"env.args.agent: '{spec}' is not 'path/to/file.py:function' or "
                                       "'package.module:function'")  # fmt: skip
        name = spec
    else:
        fn, name = spec, getattr(spec, "__qualname__", repr(spec))
    if not callable(fn):
        raise EnvironmentLoadError(f"env.args.agent: {name} is not a function")
    args = dict(args or {})
    parameters = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    takes = tuple(AGENT_INPUTS) if takes_any else tuple(p for p in parameters if p in AGENT_INPUTS)
    unknown = sorted(set(args) - set(parameters)) if not takes_any else []
    missing = [p.name for p in parameters.values() if p.default is p.empty and p.name not in (*AGENT_INPUTS, *args)
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
    if unknown or missing:
        problem = f"agent_args {unknown} are not its parameters" if unknown else f"it needs {missing}"
        raise EnvironmentLoadError(f"env.args.agent: {name}: {problem}; an agent takes any of "
                                   f"{', '.join(AGENT_INPUTS)} by name, and its agent_args")  # fmt: skip
    if "client" in takes:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise EnvironmentLoadError(f"env.args.agent: {name} takes an openai client; install the package with "
                                       "pip install 'posttrain[agents]'") from None  # fmt: skip
    return Agent(fn, name, takes, args)


@dataclass
class _Call:
    """A call waiting on its model turn."""

    request: ChatRequest
    prompt_ids: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    record: CallRecord | None = None


class AgentEnv:
    """An episode played by a user's agent through the endpoint (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        agent: str | Callable[..., Any],
        *,
        parser: str = "hermes",
        agent_args: Mapping[str, Any] | None = None,
        timeout_s: float = 120.0,
        template_kwargs: Mapping[str, Any] | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        self.agent = agent if isinstance(agent, Agent) else load_agent(agent, agent_args, base_dir)
        self.turns = ChatTurns(tokenizer, parser=parser, template_kwargs=template_kwargs)
        self.timeout_s = timeout_s
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        self.closed = False
        self.pending: _Call | None = None
        self.ids: list[int] = []
        self.calls: list[CallRecord] = []
        self.splits = 0
        self.result: Any = None
        """What the agent returned (rewards given `environments=` can read it)."""
        self.key: str | None = None
        self.thread: threading.Thread | None = None

    # --- the agent's side: its calls arrive on the server's threads ---

    def handle(self, request: ChatRequest) -> dict[str, Any]:
        try:
            prompt_ids = self.turns.prompt_ids(request)
        except Exception as error:  # a template that refuses the conversation (raise_exception)
            raise RequestError(f"the chat template cannot render these messages: {type(error).__name__}: "
                               f"{error}") from None  # fmt: skip
        call = _Call(request, prompt_ids)
        with self.lock:
            if self.closed:
                raise RequestError("this episode is over (env.max_turns or env.max_total_tokens reached)")
            self.events.put(("call", call))
        if not call.done.wait(self.timeout_s):
            raise RequestError(f"no model turn within timeout_s={self.timeout_s}")
        if call.record is None:
            raise RequestError("this episode is over (env.max_turns or env.max_total_tokens reached)")
        return call.record.response

    def _run(self, base_url: str, row: dict[str, Any]) -> None:
        try:
            self.events.put(("done", self.agent.run(base_url, row, self.timeout_s)))
        except BaseException as error:
            self.events.put(("error", error))

    # --- the driver's side ---

    def reset(self, row: dict[str, Any]) -> list[int]:
        self.key, base_url = shared_server().open(self.handle)
        self.thread = threading.Thread(target=self._run, args=(base_url, dict(row)), daemon=True,
                                       name=f"posttrain-agent-{self.key}")  # fmt: skip
        self.thread.start()
        kind, payload = self.next_event()
        if kind == "call":
            self.pending, self.ids = payload, list(payload.prompt_ids)
            return list(self.ids)
        self.close()
        if kind == "done":
            raise AgentError(f"agent {self.agent.name} returned before calling the model (returned {payload!r})")
        raise AgentError(f"agent {self.agent.name} raised before its first call: {type(payload).__name__}: "
                         f"{payload}") from payload  # fmt: skip

    def step(self, completion_ids: list[int]) -> StepResult:
        call, self.pending = self.pending, None
        if call is None:
            raise AgentError("step() without a call waiting: reset() first")
        record = self.turns.record(call.request, call.prompt_ids, completion_ids, None)
        self.calls.append(record)
        self.ids += completion_ids
        call.record = record
        call.done.set()
        kind, payload = self.next_event()
        if kind == "error":
            raise AgentError(f"agent {self.agent.name} raised: {type(payload).__name__}: {payload}") from payload
        if kind == "done":
            self.result = payload
            reward = float(payload) if isinstance(payload, int | float) else None
            return StepResult([], done=True, info=self.info(answered=True), reward=reward)
        self.pending = payload
        prompt = payload.prompt_ids
        if prompt[: len(self.ids)] == self.ids:
            observation, self.ids = prompt[len(self.ids) :], list(prompt)
            return StepResult(observation, done=False, info=self.info())
        self.ids, self.splits = list(prompt), self.splits + 1
        return StepResult([], done=False, info=self.info(), context_ids=list(prompt))

    def next_event(self) -> tuple[str, Any]:
        """The agent's next call, its return value or its exception."""
        try:
            return self.events.get(timeout=self.timeout_s)
        except queue.Empty:
            raise AgentError(f"agent {self.agent.name} made no call and did not return within "
                             f"timeout_s={self.timeout_s}") from None  # fmt: skip

    def close(self) -> None:
        """Refuse the agent's waiting and later calls and close its session: an agent still running gets an error
        response to its call and ends (its thread is a daemon's; nothing waits for it)."""
        with self.lock:
            self.closed = True
            waiting = [self.pending] if self.pending is not None else []
            self.pending = None
            while not self.events.empty():
                kind, payload = self.events.get_nowait()
                if kind == "call":
                    waiting.append(payload)
        for call in waiting:
            call.done.set()
        if self.key is not None:
            shared_server().close_session(self.key)

    def info(self, *, answered: bool = False) -> dict[str, Any]:
        """The episode's messages after its first call's (the completion reward functions read), its calls, the tool
        calls the model made and its splits."""
        messages: list[dict[str, Any]] = []
        if self.calls:
            first, last = self.calls[0], self.calls[-1]
            messages = [*last.messages, last.message][len(first.messages) :]
        tool_calls = sum(len(c.message.get("tool_calls", [])) for c in self.calls)
        return {"messages": messages, "calls": len(self.calls), "tool_calls": tool_calls, "splits": self.splits,
                "answered": int(answered)}  # fmt: skip
