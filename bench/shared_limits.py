"""Benchmark: separate `fanout batch` processes sharing one limiter through
Redis (`--limits redis://…`), against fanout-mock, in one run.

    python3 bench/shared_limits.py [--debug] [--out FILE]

- limited: 1,200 rows split over 1, 2 and 4 processes against a server limited
  to 6,000 requests a minute that says so only with 429s (no rate-limit
  headers), each process given `--rpm 6000`: shared through Redis, and, for
  comparison, each on its own (what N processes do without `--limits`).
  Ideal: (1,200 - burst) / 100 per second = 11 s whatever the processes.
- overhead: 4,000 rows of 50 ms at -c 100 against an unlimited server, one
  process, with and without a shared limiter (a huge --rpm, so every call
  makes one reservation in Redis): the cost of a round trip per call.

Each run gets a fresh mock server and a fresh redis-server on 127.0.0.1.
"""

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import ROOT, Mock  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self):
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port)).close()
                break
            except OSError:
                time.sleep(0.01)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self):
        self.process.terminate()
        self.process.wait()


@contextlib.contextmanager
def mock_and_redis(mock_flags):
    """A fresh fanout-mock and redis-server, and a scratch directory, for one
    measurement; all gone afterwards."""
    mock, redis = Mock(mock_flags), Redis()
    try:
        with tempfile.TemporaryDirectory() as directory:
            yield mock, redis, directory
    finally:
        mock.close()
        redis.close()


def refused(stats):
    """The mock's 429 count, and its share of the requests."""
    limited = stats["by_status"].get("429", 0)
    return limited, round(limited / max(stats["requests"], 1), 4)


def rows_file(directory, name, start, n):
    path = Path(directory) / name
    with path.open("w") as out:
        for i in range(start, start + n):
            out.write(json.dumps({"id": f"row-{i}", "item": f"item {i}"}) + "\n")
    return path


def run_processes(fanout, url, directory, rows, processes, concurrency, extra, limits):
    """Runs `processes` batches over `rows` rows split evenly, all at once."""
    per = rows // processes
    started = time.monotonic()
    children = []
    for p in range(processes):
        path = rows_file(directory, f"rows-{p}.jsonl", p * per, per)
        command = [
            str(fanout), "--provider", "openai", "--base-url", url + "/v1", "-q", "--json",
            "-c", str(concurrency), "--store", str(Path(directory) / f"s{p}.db"), *extra,
            "batch", str(path), "--prompt", "{{ item }}", "--id", "id", "--job", f"p{p}",
            "-o", str(Path(directory) / f"out-{p}.jsonl"), *limits,
        ]
        children.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    succeeded = failed = 0
    for child in children:
        _, err = child.communicate()
        try:
            totals = json.loads(err.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            sys.exit(f"a fanout process ended with {child.returncode} and said:\n{err}")
        succeeded += totals.get("succeeded", 0)
        failed += totals.get("failed", 0)
    return time.monotonic() - started, succeeded, failed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--debug", action="store_true", help="use the debug build (target/debug)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    profile = "debug" if args.debug else "release"
    build = ["cargo", "build", "--quiet", "-p", "fanout-cli", "-p", "fanout-mock"]
    subprocess.run(build if args.debug else build + ["--release"], cwd=ROOT, check=True)
    fanout = ROOT / f"target/{profile}/fanout"
    import providers

    providers.MOCK = ROOT / f"target/{profile}/fanout-mock"
    results = []

    def measure(scenario, mock_flags, rows, processes, concurrency, extra, shared):
        with mock_and_redis(mock_flags) as (mock, redis, directory):
            limits = ["--limits", redis.url] if shared else []
            wall, succeeded, failed = run_processes(
                fanout, mock.url, directory, rows, processes, concurrency, extra, limits
            )
            stats = mock.stats()
        limited, share = refused(stats)
        row = {
            "scenario": scenario,
            "processes": processes,
            "limits": "shared (Redis)" if shared else "each its own",
            "wall_s": round(wall, 2),
            "requests": stats["requests"],
            "per_s": round(stats["requests"] / wall, 1),
            "429s": limited,
            "429_share": share,
            "succeeded": succeeded,
            "failed": failed,
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    limited_server = ["--latency-ms", "50", "--rpm", "6000", "--no-rate-limit-headers"]
    for processes in (1, 2, 4):
        measure("limited", limited_server, 1_200, processes, 32, ["--rpm", "6000"], True)
    measure("limited", limited_server, 1_200, 4, 32, ["--rpm", "6000"], False)
    for shared in (False, True):
        measure("overhead", ["--latency-ms", "50"], 4_000, 1, 100, ["--rpm", "100000000"], shared)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
