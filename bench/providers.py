"""Benchmark: fanout's OpenAI provider against fanout-mock, side by side with a
Python peer (openai.AsyncOpenAI + asyncio), over three scenarios.

    python3 bench/providers.py [--scenario overhead|ratelimit|faults|server ...] [--out FILE]

Each run gets a fresh mock server. Reports wall seconds, CPU seconds and peak
RSS of the client process (from wait4), succeeded/failed, and the server's
/stats (requests by status, connections, most in flight). The `server` scenario
measures the mock alone with wrk (when installed), so it is never the bottleneck.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "target/release/fanout-mock"
LOAD = ROOT / "target/release/examples/openai_load"

SCENARIOS = {
    # name: (mock flags, n, concurrency, fanout extra flags, ideal seconds)
    "overhead": (["--latency-ms", "100", "--jitter-ms", "10"], 10_000, 500, [], 2.0),
    "ratelimit": (["--latency-ms", "100", "--rpm", "6000"], 3_000, 200, ["--rpm", "6000"], 30.0),
    "faults": (
        ["--latency-ms", "100", "--error-rate", "0.02", "--hang-rate", "0.01", "--hang-ms", "30000",
         "--malformed-rate", "0.01", "--seed", "7"],
        2_000, 100, ["--attempt-timeout-ms", "1000", "--max-attempts", "8"], 2.0,
    ),
}


def build() -> None:
    cargo = ["cargo", "build", "--release", "--quiet"]
    subprocess.run(cargo + ["-p", "fanout-mock", "--bin", "fanout-mock"], cwd=ROOT, check=True)
    subprocess.run(cargo + ["-p", "fanout", "--example", "openai_load"], cwd=ROOT, check=True)


def ensure_openai() -> None:
    try:
        import openai  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "openai"], check=True)


class Mock:
    def __init__(self, flags: list[str]):
        self.process = subprocess.Popen([str(MOCK), "--port", "0", *flags], stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        self.url = line.split()[-1]

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats") as answer:
            return json.load(answer)

    def close(self) -> float:
        """Stops the server; returns the CPU seconds it used."""
        self.process.terminate()
        _, _, usage = os.wait4(self.process.pid, 0)
        return usage.ru_utime + usage.ru_stime


def measured(command: list[str]) -> dict:
    """Runs a client; returns its JSON line plus CPU seconds and peak RSS."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    result = json.loads(output.strip().splitlines()[-1]) if output.strip() else {"succeeded": 0, "failed": -1}
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["rss_mb"] = usage.ru_maxrss / 1024
    result["exit"] = os.waitstatus_to_exitcode(status)
    return result


def run_scenario(name: str) -> list[dict]:
    flags, n, concurrency, extra, ideal = SCENARIOS[name]
    clients = {
        "fanout": lambda url: [str(LOAD), "--base-url", url + "/v1", "--n", str(n), "--concurrency", str(concurrency), *extra],
        "python openai": lambda url: [sys.executable, str(ROOT / "bench/peer.py"), "--base-url", url + "/v1", "--n", str(n), "--concurrency", str(concurrency)],
    }
    if name == "overhead":
        clients["fanout --no-probe"] = lambda url: clients["fanout"](url) + ["--no-probe"]
    rows = []
    for client, command in clients.items():
        mock = Mock(flags)
        try:
            result = measured(command(mock.url))
            result["stats"] = mock.stats()
        finally:
            result["server_cpu_s"] = mock.close()
        result.update(scenario=name, client=client, n=n, concurrency=concurrency, ideal_s=ideal)
        rows.append(result)
        print(json.dumps(result), file=sys.stderr)
    return rows


def server_throughput() -> dict:
    """Requests per second the mock serves (zero latency), measured with wrk."""
    if not shutil.which("wrk"):
        return {"scenario": "server", "error": "wrk is not installed (apt-get install wrk)"}
    mock = Mock([])
    script = ROOT / "target/wrk-post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.body = \'{"model":"mock-1","messages":[{"role":"user","content":"Summarize item 1 in one sentence."}]}\'\n'
    )
    try:
        out = subprocess.run(
            ["wrk", "-t2", "-c64", "-d10s", "-s", str(script), mock.url + "/v1/chat/completions"],
            capture_output=True, text=True, check=True,
        ).stdout
        stats = mock.stats()
    finally:
        mock.close()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"scenario": "server", "requests_per_s": rps, "stats": stats}


def table(rows: list[dict]) -> str:
    lines = [
        "| scenario | client | wall s (ideal) | CPU s | peak RSS MB | succeeded / failed | server: requests, 429s, 500s, connections, max in flight | server CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["scenario"] == "server":
            lines.append(f"| server | wrk, 64 connections, zero latency | | | | | {r.get('requests_per_s', r.get('error'))} requests/s | |")
            continue
        s = r["stats"]
        by = s["by_status"]
        lines.append(
            f"| {r['scenario']} | {r['client']} | {r.get('wall_s', float('nan')):.2f} ({r['ideal_s']:.1f}) | {r['cpu_s']:.2f} "
            f"| {r['rss_mb']:.0f} | {r['succeeded']} / {r['failed']} | {s['requests']}, {by.get('429', 0)}, "
            f"{by.get('500', 0)}, {s['connections']}, {s['max_in_flight']} | {r['server_cpu_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", action="append", choices=[*SCENARIOS, "server"])
    parser.add_argument("--out")
    args = parser.parse_args()
    build()
    ensure_openai()
    rows = []
    for name in args.scenario or [*SCENARIOS, "server"]:
        rows.extend([server_throughput()] if name == "server" else run_scenario(name))
    report = table(rows)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
