"""Benchmark: agents in parallel branches against fanout-mock, side by side with
the Python peer (bench/peer_agents.py: asyncio.gather + openai), in one run.

    python3 bench/agents.py [--branches 100] [--turns 5] [--tool-ms 50] [--latency-ms 100] [--concurrency 50]

100 agents of 5 model turns each (the mock asks for a tool in the first 4, the
tool takes 50 ms), 100 ms per model call, at -c 50; beside it the same 500 model
calls as plain tasks (fanout's executor, and the Python peer's bench/peer.py).
Ideal: the calls need calls x latency / concurrency of the cap's time (1.0 s),
and one agent needs turns x latency + (turns - 1) x tool (0.7 s): the larger.
Reports wall seconds against the ideal, calls, and the client's CPU per call.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import ROOT, Mock, ensure_openai, measured  # noqa: E402

AGENTS = ROOT / "target/release/examples/agents_load"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--branches", type=int, default=100)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tool-ms", type=int, default=50)
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    cargo = ["cargo", "build", "--release", "--quiet"]
    subprocess.run(cargo + ["-p", "fanout-mock", "--bin", "fanout-mock"], cwd=ROOT, check=True)
    subprocess.run(cargo + ["-p", "fanout", "--example", "agents_load"], cwd=ROOT, check=True)
    ensure_openai()

    calls = args.branches * args.turns
    latency, tool = args.latency_ms / 1000, args.tool_ms / 1000
    ideal = max(calls * latency / args.concurrency, args.turns * latency + (args.turns - 1) * tool)
    shape = ["--branches", str(args.branches), "--turns", str(args.turns), "--concurrency", str(args.concurrency)]
    clients = {
        "fanout agents": lambda url: [str(AGENTS), "--base-url", url + "/v1", "--tool-ms", str(args.tool_ms), *shape],
        "python openai agents": lambda url: [sys.executable, str(ROOT / "bench/peer_agents.py"), "--base-url",
                                             url + "/v1", "--tool-ms", str(args.tool_ms), *shape],
        "fanout, one call per task": lambda url: [str(AGENTS), "--base-url", url + "/v1", "--single", *shape],
        "python openai, one call per task": lambda url: [sys.executable, str(ROOT / "bench/peer.py"), "--base-url",
                                                         url + "/v1", "--n", str(calls), "--concurrency",
                                                         str(args.concurrency)],
    }
    rows = []
    for client, command in clients.items():
        mock = Mock(["--latency-ms", str(args.latency_ms), "--tool-turns", str(args.turns - 1)])
        try:
            result = measured(command(mock.url))
            result["server_requests"] = mock.stats().get("requests")
        finally:
            mock.close()
        result.update(client=client, ideal_s=ideal)
        print(json.dumps(result), file=sys.stderr)
        rows.append(result)

    print(f"| client | wall s (ideal {ideal:.2f}) | x ideal | model calls | client CPU s | CPU per call |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        n = r.get("calls") or r.get("server_requests") or 1
        print(f"| {r['client']} | {r['wall_s']:.2f} | {r['wall_s'] / ideal:.2f} | {r.get('server_requests')} | "
              f"{r['cpu_s']:.2f} | {r['cpu_s'] * 1e6 / n:.0f} µs |")


main()
