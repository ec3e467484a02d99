"""`posttrain serve MODEL_DIR`: a model behind an OpenAI-compatible chat-completions endpoint on 127.0.0.1, every
call recorded as token ids and log-probs.

    with posttrain.agents.serve("runs/arith-tools-sft/final", parser="hermes") as endpoint:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="none")
        client.chat.completions.create(model="posttrain", messages=[...], tools=[...])
        endpoint.calls[0].prompt_ids, endpoint.calls[0].completion_ids, endpoint.calls[0].logprobs

Calls that wait at the same time are sampled together, one engine call over all of them (`BatchSampler`), so an
agent running many conversations on threads is batched as a training step's episodes are. A request's
`temperature`, `top_p`, `max_tokens` (at most the endpoint's `max_new_tokens`) and `stop` apply to its call; the
completion keeps its stop token or the token that completed a stop string, as the ids sampled. `record=` appends each
call to a JSONL file (prompt and completion ids, log-probs, messages, tools).
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.agents.openai_format import ChatRequest, RequestError
from posttrain.agents.server import EndpointServer
from posttrain.agents.turns import MODEL_NAME, CallRecord, ChatTurns
from posttrain.rollout import ENGINES, SamplingParams
from posttrain.rollout.engine import SamplingParamsError


@dataclass
class Sampled:
    """One call's sample."""

    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    done: threading.Event = field(default_factory=threading.Event)
    result: Sampled | BaseException | None = None


class BatchSampler:
    """Samples every waiting call in one engine call per distinct `SamplingParams`, on one worker thread (the only
    one that runs the model)."""

    def __init__(self, engine: Any, model: Any, tokenizer: Any, *, seed: int = 0, max_batch: int = 64) -> None:
        self.engine, self.model, self.tokenizer, self.max_batch = engine, model, tokenizer, max_batch
        self.generator = torch.Generator(device=getattr(model, "device", "cpu")).manual_seed(seed)
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="posttrain-sampler", daemon=True)
        self.thread.start()

    def sample(self, prompt_ids: list[int], params: SamplingParams) -> Sampled:
        pending = _Pending(list(prompt_ids), params)
        self.queue.put(pending)
        pending.done.wait()
        if isinstance(pending.result, BaseException):
            raise pending.result
        return pending.result  # type: ignore[return-value]

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, stopping = [first], False
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            by_params: dict[SamplingParams, list[_Pending]] = {}
            for pending in batch:
                by_params.setdefault(pending.params, []).append(pending)
            for params, group in by_params.items():
                self._generate(params, group)
            if stopping:
                return

    def _generate(self, params: SamplingParams, group: list[_Pending]) -> None:
        try:
            self.model.eval()
            rollouts = self.engine.generate(self.model, [p.prompt_ids for p in group], params, n=1,
                                            generator=self.generator, tokenizer=self.tokenizer)  # fmt: skip
            for pending, ids, logp, reason in zip(group, rollouts.completion_ids, rollouts.logprobs,
                                                  rollouts.finish_reasons):  # fmt: skip
                pending.result = Sampled(list(ids), logp.float().cpu().tolist(), reason)
        except Exception as error:  # each waiting call answers with it (a 500), the sampler goes on
            for pending in group:
                pending.result = error
        finally:
            for pending in group:
                pending.done.set()


class ChatEndpoint:
    """A model served on 127.0.0.1 (see the module docstring); `engine` a registered engine's name or an engine.
    Close it (or use it as a context manager) to stop."""

    def __init__(self, model: Any, tokenizer: Any, *, engine: str | Any = "native", parser: str = "hermes",
                 port: int = 0, max_new_tokens: int = 256, temperature: float = 1.0, seed: int = 0,
                 record: str | Path | None = None, template_kwargs: dict[str, Any] | None = None,
                 model_name: str = MODEL_NAME) -> None:  # fmt: skip
        self.turns = ChatTurns(tokenizer, parser=parser, template_kwargs=template_kwargs, model_name=model_name)
        self.tokenizer, self.max_new_tokens, self.temperature = tokenizer, max_new_tokens, temperature
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)  # out of range: fails here
        self.sampler = BatchSampler(ENGINES[engine] if isinstance(engine, str) else engine, model, tokenizer,
                                    seed=seed)  # fmt: skip
        self.calls: list[CallRecord] = []
        self.record_path = Path(record) if record is not None else None
        self.lock = threading.Lock()
        self.server = EndpointServer(port, model_name=model_name)
        self.server.open(self.complete, key="")
        self.base_url = self.server.url()

    def params_for(self, request: ChatRequest) -> SamplingParams:
        """The call's sampling: the request's settings where it gives them, else the endpoint's."""
        s = request.sampling
        asked = s.get("max_completion_tokens", s.get("max_tokens", self.max_new_tokens))
        return SamplingParams(
            max_new_tokens=min(int(asked), self.max_new_tokens), temperature=float(s.get("temperature",
                                                                                         self.temperature)),
            top_p=float(s.get("top_p", 1.0)), stop_token_ids=(self.tokenizer.eos_token_id,),
            stop_strings=tuple(s.get("stop", ())),
        )  # fmt: skip

    def complete(self, request: ChatRequest) -> dict[str, Any]:
        try:
            params = self.params_for(request)
        except SamplingParamsError as error:
            raise RequestError(str(error)) from None
        prompt_ids = self.turns.prompt_ids(request)
        sampled = self.sampler.sample(prompt_ids, params)
        call = self.turns.record(request, prompt_ids, sampled.completion_ids, sampled.logprobs)
        with self.lock:
            self.calls.append(call)
            if self.record_path is not None:
                with self.record_path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(call.to_json(), ensure_ascii=False) + "\n")
        return call.response

    def wait(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        self.server.thread.join()

    def close(self) -> None:
        self.server.shutdown()
        self.sampler.close()

    def __enter__(self) -> ChatEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(model: Any, tokenizer: Any = None, **kwargs: Any) -> ChatEndpoint:
    """Serve `model` (a model object, or a local model directory whose tokenizer is loaded with it) on 127.0.0.1;
    keyword arguments as `ChatEndpoint` takes them. Returns the running endpoint."""
    if isinstance(model, str | Path):
        from posttrain.policies import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(model, key="model_dir")
        model = load_model(model)
    if tokenizer is None:
        raise ValueError("serve: pass tokenizer= with a model object")
    return ChatEndpoint(model, tokenizer, **kwargs)
