"""Benchmark: `fanout batch` over N rows against the in-process mock provider
(zero latency), through the job store. Reports wall seconds, rows per second,
and peak RSS, at several N to show that memory is flat in the number of rows.

    python3 bench/batch.py [N ...]        (default: 100000 1000000)
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FANOUT = ROOT / "target/release/fanout"


def write_rows(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"row-{i}", "essay": f"Essay number {i} about the sea."}) + "\n")


def run_batch(rows: Path, store: Path) -> tuple[float, float]:
    """Runs the batch; returns (wall seconds, peak RSS in MB)."""
    command = [str(FANOUT), "--provider", "mock", "-q", "-c", "256", "--store", str(store), "batch", str(rows),
               "--prompt", "Grade this essay: {{ essay }}", "--id", "id", "--job", "bench", "-o", os.devnull]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the batch failed: {command}")
    return wall, usage.ru_maxrss / 1024


def stored_rows(store: Path) -> int:
    listing = subprocess.run([str(FANOUT), "--store", str(store), "--json", "jobs", "list"],
                             capture_output=True, text=True, check=True)
    return json.loads(listing.stdout)[0]["finished"]


def main() -> None:
    sizes = [int(n) for n in sys.argv[1:]] or [100_000, 1_000_000]
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "fanout-cli"], cwd=ROOT, check=True)
    print("| rows | wall s | rows/s | peak RSS MB | rows in the store |")
    print("| --- | --- | --- | --- | --- |")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rows, store = Path(tmp) / "rows.jsonl", Path(tmp) / "fanout.db"
            write_rows(rows, n)
            wall, rss = run_batch(rows, store)
            print(f"| {n:,} | {wall:.1f} | {n / wall:,.0f} | {rss:.1f} | {stored_rows(store):,} |", flush=True)


if __name__ == "__main__":
    main()
