"""Benchmark: `fanout report` on a 1,000,000-row job — wall time, peak RSS,
the HTML's size.

    python3 bench/report.py [path/to/fanout]   (default: target/release/fanout)

The job is a real one (the mock provider's batch of 1,000 rows) whose
records are then copied with new indexes, log-normal latencies (median
400 ms), finish times spread over an hour, 1% failed, each with its call
history (3% retried after a 429, 1% hedged) and a pause every two minutes,
written to the store with sqlite3 directly: a million real calls would take
an hour.
Prints one JSON line; the report's path comes first, to open it.
"""
import json, os, random, sqlite3, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
fanout = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/fanout")
d = tempfile.mkdtemp()
store = os.path.join(d, "s.db")
rows = os.path.join(d, "rows.jsonl")
with open(rows, "w") as f:
    for i in range(1000):
        f.write(json.dumps({"q": f"q{i}"}) + "\n")
subprocess.run([fanout, "--store", store, "--provider", "mock", "-q", "batch", rows, "--prompt", "Say {{ q }}", "--job", "big", "-o", os.devnull], check=True)
db = sqlite3.connect(store)
job = db.execute("SELECT id FROM jobs WHERE name='big'").fetchone()[0]
base = db.execute("SELECT task_id, status, answer, input_tokens, output_tokens, attempts, finished_at FROM tasks WHERE job_id=?", (job,)).fetchall()
start = base[0][6]
rng = random.Random(1)


def history(rng, finished_ms, latency, failed, tokens_in, tokens_out):
    """The rows' calls in the store's form: 3% retried after a 429, 1% hedged, failures tried twice."""
    sent = int(finished_ms - latency)
    if failed:
        return [[sent - 900, 300, "f", "server", 500, None, 0, 0], [sent, int(latency), "r", "server", 500, None, 0, 0]]
    roll = rng.random()
    if roll < 0.03:
        return [[sent - 2000, 40, "f", "rate_limited", 429, None, 0, 0], [sent, int(latency), "r", "ok", 0, None, tokens_in, tokens_out]]
    if roll < 0.04:
        return [[sent - 3000, int(latency) + 3000, "f", "cancelled", 0, None, 0, 0], [sent, int(latency), "h", "ok", 0, None, tokens_in, tokens_out]]
    return [[sent, int(latency), "f", "ok", 0, None, tokens_in, tokens_out]]


batch = []
for i in range(1000, 1_000_000):
    t = base[i % 1000]
    failed = rng.random() < 0.01
    latency = rng.lognormvariate(6.0, 0.6)
    finished_ms = start * 1000 + i * 3_600_000 // 1_000_000
    calls = history(rng, finished_ms, latency, failed, t[3], t[4])
    batch.append((job, i, f"row-{i}", "failed" if failed else "succeeded", None if failed else t[2],
                  "server" if failed else None, "boom" if failed else None, 500 if failed else None,
                  t[3], t[4], latency, len(calls), finished_ms // 1000, json.dumps(calls, separators=(",", ":"))))
    if len(batch) == 50_000:
        db.executemany("INSERT INTO tasks (job_id, idx, task_id, status, answer, error_kind, error_message, error_status, input_tokens, output_tokens, latency_ms, attempts, finished_at, calls) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
        batch = []
if batch:
    db.executemany("INSERT INTO tasks (job_id, idx, task_id, status, answer, error_kind, error_message, error_status, input_tokens, output_tokens, latency_ms, attempts, finished_at, calls) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
db.execute("UPDATE jobs SET total = 1000000 WHERE id = ?", (job,))
# A pause every two minutes, and the limit halved and restored around each.
events = []
for minute in range(0, 60, 2):
    at = start * 1000 + minute * 60_000
    events += [(job, at, "pause", 2_000.0, "429: Rate limit reached"), (job, at, "limit", 25.0, None), (job, at + 30_000, "limit", 50.0, None)]
db.executemany("INSERT INTO run_events (job_id, at_ms, kind, value, detail) VALUES (?,?,?,?,?)", events)
db.commit()
db.close()
out = os.path.join(d, "big.html")
print(out)
t0 = time.perf_counter()
done = subprocess.run(["/usr/bin/time", "-f", "%M", fanout, "--store", store, "report", "big", "-o", out], capture_output=True, text=True)
wall = time.perf_counter() - t0
print(json.dumps({"rows": 1_000_000, "wall_s": round(wall, 2), "peak_rss_mb": round(int(done.stderr.strip().splitlines()[-1]) / 1024, 1),
                  "html_kb": round(os.path.getsize(out) / 1024, 1), "store_mb": round(os.path.getsize(store) / 2**20, 1), "exit": done.returncode}))
