"""Benchmark: what the call history costs — store size and batch throughput,
with it (the default) and without (`--no-history`), side by side in one run.

    python3 bench/history.py [path/to/fanout] [rows]   (default: target/release/fanout, 100000)

The provider is the in-process mock with no latency: nothing but fanout's
own work (render, call, encode, commit) is timed, so the history's share is
the largest it can be. Runs alternate (on, off, on, off, ...) so the machine's
noise falls on both alike; the store is checkpointed before it is measured.
Prints one JSON line per run, then a summary line.
"""
import json, os, sqlite3, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
fanout = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/fanout")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
d = tempfile.mkdtemp()
rows = os.path.join(d, "rows.jsonl")
with open(rows, "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"row-{i}", "essay": f"essay number {i} " + "lorem ipsum " * 8}) + "\n")


def run(history: bool, attempt: int) -> dict:
    store = os.path.join(d, f"{'on' if history else 'off'}-{attempt}.db")
    command = [fanout, "--store", store, "--provider", "mock", "-q", "-c", "64", "batch", rows,
               "--prompt", "Grade {{ essay }}", "--id", "id", "--job", "bench", "-o", os.devnull]
    if not history:
        command.append("--no-history")
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - t0
    db = sqlite3.connect(store)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with_calls = db.execute("SELECT count(*) FROM tasks WHERE calls IS NOT NULL").fetchone()[0]
    db.close()
    size = os.path.getsize(store) + (os.path.getsize(store + "-wal") if os.path.exists(store + "-wal") else 0)
    return {"history": history, "rows": n, "wall_s": round(wall, 2), "rows_per_s": round(n / wall),
            "store_mb": round(size / 2**20, 2), "rows_with_history": with_calls}


results = []
for attempt in range(3):
    for history in (True, False):
        result = run(history, attempt)
        print(json.dumps(result), flush=True)
        results.append(result)
on = [r for r in results if r["history"]]
off = [r for r in results if not r["history"]]
median = lambda runs, key: statistics.median(r[key] for r in runs)
print(json.dumps({
    "throughput_on_vs_off": round(median(on, "rows_per_s") / median(off, "rows_per_s"), 3),
    "store_mb_on": median(on, "store_mb"), "store_mb_off": median(off, "store_mb"),
    "store_growth": round(median(on, "store_mb") / median(off, "store_mb"), 3),
}))
