"""The Python peer: asyncio.gather over tasks guarded by an asyncio.Semaphore,
each calling openai.AsyncOpenAI chat completions with the package's default
settings. Prints one JSON line like fanout's openai_load example."""

import argparse
import asyncio
import json
import time

from openai import AsyncOpenAI


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()

    client = AsyncOpenAI(base_url=args.base_url, api_key="sk-mock")
    semaphore = asyncio.Semaphore(args.concurrency)
    errors: dict[str, int] = {}

    async def one(i: int) -> bool:
        async with semaphore:
            try:
                answer = await client.chat.completions.create(
                    model="mock-1",
                    messages=[{"role": "user", "content": f"Summarize item {i} in one sentence."}],
                )
                return answer.choices[0].message.content is not None
            except Exception as error:  # every failure counts, whatever its type
                name = type(error).__name__
                errors[name] = errors.get(name, 0) + 1
                return False

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(args.n)))
    wall = time.perf_counter() - start
    succeeded = sum(results)
    print(json.dumps({"succeeded": succeeded, "failed": args.n - succeeded, "wall_s": wall, "errors": errors}))


asyncio.run(main())
