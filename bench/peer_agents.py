"""The Python peer for agents: asyncio.gather over agent loops, each calling
openai.AsyncOpenAI chat completions with a tool offered, running the tool calls
it gets (all of a turn's at once, an asyncio.sleep of --tool-ms each) and asking
again until a text answer. An asyncio.Semaphore bounds the model calls in
flight, as fanout's concurrency cap does. Prints one JSON line."""

import argparse
import asyncio
import json
import time

from openai import AsyncOpenAI

TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Looks a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--branches", type=int, default=100)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tool-ms", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()

    client = AsyncOpenAI(base_url=args.base_url, api_key="sk-mock")
    semaphore = asyncio.Semaphore(args.concurrency)
    calls = 0

    async def tool(_call) -> str:
        await asyncio.sleep(args.tool_ms / 1000)
        return "an entry"

    async def agent(i: int) -> bool:
        nonlocal calls
        messages = [{"role": "user", "content": f"look up word=w{i}"}]
        for _ in range(args.turns):
            async with semaphore:
                calls += 1
                answer = await client.chat.completions.create(model="mock-1", messages=messages, tools=TOOLS)
            message = answer.choices[0].message
            if not message.tool_calls:
                return True
            messages.append(message.model_dump(exclude_none=True))
            results = await asyncio.gather(*(tool(c) for c in message.tool_calls))
            for call, result in zip(message.tool_calls, results):
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        return False

    start = time.perf_counter()
    finished = sum(await asyncio.gather(*(agent(i) for i in range(args.branches))))
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "calls": calls, "finished": finished}))


asyncio.run(main())
