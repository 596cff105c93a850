"""Benchmark: `fanout batch --queue` with 1, 2 and 4 `fanout worker`s through
Redis, against fanout-mock, beside the same rows run by one local process, in
one run.

    python3 bench/workers.py [--debug] [--no-build] [--only SCENARIO] [--out FILE]

- limited: 1,200 rows against a server limited to 6,000 requests a minute
  that says so only with 429s (no rate-limit headers), the job given
  `--rpm 6000`: all workers together should run at the limit (ideal:
  (1,200 - burst) / 100 per second = 11 s) with 0 failed and few 429s.
- stated: the same rows against the same limit stated in the server's
  rate-limit headers, the job given no --rpm: the limit the workers read in
  the headers is the one they share through Redis, so together they should
  keep to it as with --rpm.
- unlimited: 4,000 rows of 50 ms at -c 100 per worker against an unlimited
  server: how far more workers go before this machine's CPU is the limit.
- local: the same 4,000 rows by one `fanout batch` without a queue, for the
  cost of the queue per row (Redis round trips, the result stream).

Named workers.py, not queue.py: a file of that name beside the other bench
scripts would be imported as Python's own `queue` module by them.

Each run gets a fresh mock server and a fresh redis-server on 127.0.0.1; the
producer and the workers run on this machine (2 cores here), so the
unlimited rows measure the cost of the machinery, not a fleet.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import ROOT  # noqa: E402
from shared_limits import mock_and_redis, refused, rows_file  # noqa: E402


def fanout_command(fanout, url, directory, concurrency, *args):
    return [
        str(fanout), "--provider", "openai", "--base-url", url + "/v1", "-q",
        "-c", str(concurrency), "--store", str(Path(directory) / "producer.db"), *args,
    ]


def run_queued(fanout, url, redis_url, directory, rows, workers, concurrency, extra):
    """One producer and `workers` workers over `rows` rows; returns (wall, totals)."""
    path = rows_file(directory, "rows.jsonl", 0, rows)
    output = Path(directory) / "out.jsonl"
    producer = subprocess.Popen(
        fanout_command(fanout, url, directory, concurrency, "--json", *extra)
        + ["batch", str(path), "--prompt", "{{ item }}", "--id", "id", "--job", "bench",
           "--queue", redis_url, "-o", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    started = time.monotonic()
    children = [
        subprocess.Popen(
            [str(fanout), "--provider", "openai", "--base-url", url + "/v1", "-q", "-c", str(concurrency),
             "--store", str(Path(directory) / f"w{w}.db"), "worker", redis_url, "--job", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for w in range(workers)
    ]
    _, err = producer.communicate()
    wall = time.monotonic() - started
    for child in children:
        _, worker_err = child.communicate()
        if child.returncode != 0:
            sys.exit(f"a worker ended with {child.returncode} and said:\n{worker_err}")
    try:
        totals = json.loads(err.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"the producer ended with {producer.returncode} and said:\n{err}")
    return wall, totals


def run_local(fanout, url, directory, rows, concurrency):
    path = rows_file(directory, "rows.jsonl", 0, rows)
    started = time.monotonic()
    done = subprocess.run(
        fanout_command(fanout, url, directory, concurrency, "--json")
        + ["batch", str(path), "--prompt", "{{ item }}", "--id", "id", "--job", "local",
           "-o", str(Path(directory) / "out.jsonl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wall = time.monotonic() - started
    return wall, json.loads(done.stderr.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--debug", action="store_true", help="use the debug build (target/debug)")
    parser.add_argument("--no-build", action="store_true", help="run the binaries already built")
    parser.add_argument("--only", choices=["limited", "stated", "unlimited"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    profile = "debug" if args.debug else "release"
    build = ["cargo", "build", "--quiet", "-p", "fanout-cli", "-p", "fanout-mock"]
    if not args.no_build:
        subprocess.run(build if args.debug else build + ["--release"], cwd=ROOT, check=True)
    fanout = ROOT / f"target/{profile}/fanout"
    import providers

    providers.MOCK = ROOT / f"target/{profile}/fanout-mock"
    results = []

    def measure(scenario, mock_flags, rows, workers, concurrency, extra):
        if args.only not in (None, scenario):
            return
        with mock_and_redis(mock_flags) as (mock, redis, directory):
            if workers == 0:
                wall, totals = run_local(fanout, mock.url, directory, rows, concurrency)
            else:
                wall, totals = run_queued(
                    fanout, mock.url, redis.url, directory, rows, workers, concurrency, extra
                )
            stats = mock.stats()
        limited, share = refused(stats)
        row = {
            "scenario": scenario,
            "workers": workers or "none (local)",
            "wall_s": round(wall, 2),
            "rows_per_s": round(rows / wall, 1),
            "requests": stats["requests"],
            "429s": limited,
            "429_share": share,
            "max_in_flight": stats["max_in_flight"],
            "succeeded": totals.get("succeeded", 0),
            "failed": totals.get("failed", 0),
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    limited_server = ["--latency-ms", "50", "--rpm", "6000", "--no-rate-limit-headers"]
    for workers in (1, 2, 4):
        measure("limited", limited_server, 1_200, workers, 32, ["--rpm", "6000"])
    for workers in (1, 2, 4):
        measure("stated", ["--latency-ms", "50", "--rpm", "6000"], 1_200, workers, 32, [])
    measure("unlimited", ["--latency-ms", "50"], 4_000, 0, 100, [])
    for workers in (1, 2, 4):
        measure("unlimited", ["--latency-ms", "50"], 4_000, workers, 100, [])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
