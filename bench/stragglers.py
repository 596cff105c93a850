"""Benchmark: `fanout batch` with default flags against fanout-mock, side by side
with the Python peer (bench/peer.py: asyncio.gather + openai), in one run.

    python3 bench/stragglers.py [--scenario tail|faults|overhead|tokens|queue|kill9 ...] [--out FILE]

Scenarios (issue "One slow call never holds the rest back"):
- tail:     2,000 rows at -c 100, 100 ms answers, 2% take 10 s then answer;
- faults:   2,000 rows at -c 100, 2% HTTP 500, 1% hang 30 s, 1% malformed JSON;
- overhead: 10,000 rows at -c 500, 100 ms answers (the peer is left out: 40 s),
            beside the same calls through the library alone (examples/openai_load)
            and through bare reqwest (openai_load --bare): the floor of the HTTP
            stack on this machine, which shares its 2 cores with the server;
- tokens:   600 rows against a server limited to 30,000 tokens per minute, which
            says so only in its x-ratelimit-* headers (fanout is given no --tpm);
- queue:    24 rows at -c 8 with --attempt-timeout 2 against a server that
            computes 2 requests at once and queues the rest (1 s each);
- kill9:    3,000 rows at -c 50, 50 ms answers, kill -9 after 1.5 s, then resume.

Each run gets a fresh mock server on 127.0.0.1. Reports wall seconds, server
requests (and 429s / 500s), succeeded / failed, and fanout's hedges.
"""

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import LOAD, ROOT, Mock, build, ensure_openai  # noqa: E402

FANOUT = ROOT / "target/release/fanout"

SCENARIOS = {
    # name: (mock flags, rows, concurrency, extra fanout flags, ideal seconds, with peer)
    "tail": (["--latency-ms", "100", "--hang-rate", "0.02", "--hang-ms", "10000", "--seed", "3"], 2_000, 100, [], 2.0, True),
    "faults": (
        ["--latency-ms", "100", "--error-rate", "0.02", "--hang-rate", "0.01", "--hang-ms", "30000",
         "--malformed-rate", "0.01", "--seed", "7"],
        2_000, 100, [], 2.0, True,
    ),
    "overhead": (["--latency-ms", "100"], 10_000, 500, [], 2.0, False),
    "tokens": (["--latency-ms", "100", "--tpm", "30000"], 600, 16, [], 24.0, True),
    "queue": (["--latency-ms", "1000", "--capacity", "2"], 24, 8, ["--attempt-timeout", "2"], 12.0, False),
}


def rows_file(directory, n):
    path = Path(directory) / "rows.jsonl"
    with path.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"row-{i}", "item": f"item {i}"}) + "\n")
    return path


def fanout_command(url, rows, concurrency, extra, directory, job="bench"):
    return [
        str(FANOUT), "--provider", "openai", "--base-url", url + "/v1", "--model", "mock-1",
        "-q", "--json", "-c", str(concurrency), *extra,
        "batch", str(rows), "--prompt", "Summarize {{ item }} in one sentence.", "--id", "id",
        "--job", job, "--store", str(Path(directory) / "fanout.db"), "-o", str(Path(directory) / "out.jsonl"),
    ]


def run_fanout(url, rows, concurrency, extra, directory):
    start = time.perf_counter()
    done = subprocess.run(fanout_command(url, rows, concurrency, extra, directory), capture_output=True, text=True)
    wall = time.perf_counter() - start
    totals = json.loads(done.stderr.strip().splitlines()[-1]) if done.stderr.strip() else {}
    return {"wall_s": wall, "exit": done.returncode, "succeeded": totals.get("succeeded"),
            "failed": totals.get("tasks", 0) - totals.get("succeeded", 0), "hedges": totals.get("hedges"),
            "hedges_won": totals.get("hedges_won"), "calls": totals.get("calls")}


def run_load(url, n, concurrency, *flags):
    """The library alone, or (with --bare) reqwest alone: examples/openai_load."""
    done = subprocess.run([str(LOAD), "--base-url", url + "/v1", "--n", str(n), "--concurrency", str(concurrency),
                           *flags], capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_peer(url, n, concurrency):
    done = subprocess.run([sys.executable, str(ROOT / "bench/peer.py"), "--base-url", url + "/v1", "--n", str(n),
                           "--concurrency", str(concurrency)], capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scenario(name):
    flags, n, concurrency, extra, ideal, with_peer = SCENARIOS[name]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        path = rows_file(directory, n)
        clients = [("fanout", lambda url: run_fanout(url, path, concurrency, extra, directory))]
        if with_peer:
            clients.append(("python openai", lambda url: run_peer(url, n, concurrency)))
        if name == "overhead":
            clients.append(("fanout library", lambda url: run_load(url, n, concurrency)))
            clients.append(("bare reqwest (floor)", lambda url: run_load(url, n, concurrency, "--bare")))
        for client, run in clients:
            mock = Mock(flags)
            try:
                result = run(mock.url)
                result["stats"] = mock.stats()
            finally:
                mock.close()
            result.update(scenario=name, client=client, rows=n, ideal_s=ideal)
            print(json.dumps(result), file=sys.stderr)
            rows.append(result)
    return rows


def kill9():
    """kill -9 after 1.5 s, then the same command again (which resumes the job)."""
    n, concurrency = 3_000, 50
    with tempfile.TemporaryDirectory() as directory:
        path = rows_file(directory, n)
        mock = Mock(["--latency-ms", "50"])
        try:
            command = fanout_command(mock.url, path, concurrency, [], directory, job="crash")
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5)
            child.send_signal(signal.SIGKILL)
            child.wait()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            totals = json.loads(done.stderr.strip().splitlines()[-1])
            stats = mock.stats()
        finally:
            mock.close()
    return [{"scenario": "kill9", "client": "fanout", "rows": n, "ideal_s": None, "stats": stats,
             "succeeded": totals.get("succeeded"), "failed": totals.get("tasks", 0) - totals.get("succeeded", 0),
             "wall_s": wall, "hedges": totals.get("hedges"), "hedges_won": totals.get("hedges_won")}]


def table(rows):
    lines = ["| scenario | client | wall s (ideal) | succeeded / failed | server requests, 429s, 500s | hedges sent / won |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = r["stats"]
        by = s.get("by_status", {})
        ideal = f"{r['ideal_s']:.1f}" if r.get("ideal_s") else "-"
        hedges = f"{r.get('hedges')} / {r.get('hedges_won')}" if r.get("hedges") is not None else ""
        lines.append(f"| {r['scenario']} | {r['client']} | {r['wall_s']:.2f} ({ideal}) | {r.get('succeeded')} / {r.get('failed')} "
                     f"| {s['requests']}, {by.get('429', 0)}, {by.get('500', 0)} | {hedges} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", action="append", choices=[*SCENARIOS, "kill9"])
    parser.add_argument("--out")
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "fanout-cli"], cwd=ROOT, check=True)
    build()
    ensure_openai()
    rows = []
    for name in args.scenario or [*SCENARIOS, "kill9"]:
        rows.extend(kill9() if name == "kill9" else scenario(name))
    report = table(rows)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
