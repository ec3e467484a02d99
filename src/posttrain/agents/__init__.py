"""Bring your own agent (docs/agents.md, "Bring your own agent"): an OpenAI-compatible chat-completions endpoint on
127.0.0.1 served by posttrain's engine, recording the token ids and log-probs of every call, and the environment
that trains an agent written against the `openai` client through it, unchanged.

    endpoint = posttrain.agents.serve("runs/arith-tools-sft/final")     # posttrain serve MODEL_DIR
    env: {name: openai_agent, args: {agent: my_agent.py:solve}}          # an RL recipe's environment

Nothing here imports `openai` until an agent that takes a client runs (`pip install 'posttrain[agents]'`).
"""

from posttrain.agents.env import AgentEnv, AgentError, load_agent
from posttrain.agents.openai_format import ChatRequest, RequestError, parse_request
from posttrain.agents.serve import ChatEndpoint, serve
from posttrain.agents.server import EndpointServer, shared_server
from posttrain.agents.turns import CallRecord, ChatTurns

__all__ = [
    "AgentEnv", "AgentError", "CallRecord", "ChatEndpoint", "ChatRequest", "ChatTurns", "EndpointServer",
    "RequestError", "load_agent", "parse_request", "serve", "shared_server",
]  # fmt: skip
