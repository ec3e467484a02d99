"""A calculator agent written against the `openai` client, as an agent framework would have it: call the model
with the calculator's schema, run the calls it makes, call again, until it answers. Trained unchanged through
posttrain's endpoint by recipes/arith-tools-agent.yaml (docs/agents.md, "Bring your own agent"); pointed at
`posttrain serve MODEL_DIR` it runs the model alone:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    solve(client, {"prompt": [{"role": "user", "content": "37*58="}]})
"""

import json

from posttrain.envs.builtin_tools import evaluate_arithmetic

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "The "
                   "expression, e.g. \"37*58\"."}}, "required": ["expression"]}}}]  # fmt: skip


def solve(client, row, max_calls=3):
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    for _ in range(max_calls):
        message = client.chat.completions.create(model="posttrain", messages=messages, tools=TOOLS).choices[0].message
        messages.append(message)
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            try:
                value = evaluate_arithmetic(json.loads(call.function.arguments)["expression"])
            except (ValueError, KeyError, TypeError) as error:  # a bad call is the model's mistake, told to it
                value = f"error: {error}"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(value)})
    return None  # the run's rewards score the episode's messages; a number here would add to them
