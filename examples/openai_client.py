"""Talk to `tunelab api` with the official openai client: a plain reply, a streamed one, a streamed tool call, and
the answer after two tool results sent back at once.

    tunelab train examples/smollm2_lora_tools.yaml
    tunelab api examples/quickstart_chat.yaml adapter_name_or_path=saves/smollm2-135m/lora/tools
    python examples/openai_client.py            # API_PORT, API_KEY and API_MODEL_NAME as for the server

The model name defaults to the config's model_name_or_path, which is what the server answers to by default.
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=f"http://127.0.0.1:{os.environ.get('API_PORT', '8000')}/v1",
                api_key=os.environ.get("API_KEY", "none"))
model = os.environ.get("API_MODEL_NAME", "tunelab:smollm2-135m-instruct")
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]

# 1. A plain question.
reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2 + 2?"}])
print("plain:", reply.choices[0].message.content, reply.usage)

# 2. The same, streamed.
print("streamed: ", end="")
for chunk in client.chat.completions.create(model=model, stream=True,
                                            messages=[{"role": "user", "content": "Name a primary color."}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

# 3. A question the tools answer: the calls arrive as streamed tool_calls deltas.
question = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
calls: dict[int, dict] = {}
for chunk in client.chat.completions.create(model=model, messages=question, tools=tools, stream=True):
    choice = chunk.choices[0]
    for call in choice.delta.tool_calls or []:
        calls[call.index] = {"id": call.id, "type": "function",
                             "function": {"name": call.function.name, "arguments": call.function.arguments}}
    if choice.finish_reason:
        print("finish_reason:", choice.finish_reason)
print("tool calls:", json.dumps(list(calls.values()), indent=1))

# 4. Both results go back at once (parallel tool results), and the model answers from them.
if not calls:
    raise SystemExit("the model called no tool: is the tools adapter (examples/smollm2_lora_tools.yaml) served?")
weather = {"Paris": {"condition": "sunny", "temperature_c": 21}, "Rome": {"condition": "rainy", "temperature_c": 17}}
results = [{"role": "tool", "tool_call_id": call["id"],
            "content": json.dumps(weather.get(json.loads(call["function"]["arguments"]).get("city"), {}))}
           for call in calls.values()]
answer = client.chat.completions.create(
    model=model, tools=tools,
    messages=[*question, {"role": "assistant", "content": None, "tool_calls": list(calls.values())}, *results])
print("answer:", answer.choices[0].message.content or answer.choices[0].message.tool_calls)
