"""Benchmark: a job through the mock's Batch API (`--via batch-api`) — wall
time, fanout's peak RSS, and remote submissions per row (must be exactly 1),
for OpenAI's and Anthropic's shapes, in one run.

    python3 bench/batch_api.py [path/to/fanout] [rows]
        (default: target/release/fanout and target/release/fanout-mock, 100000 rows)

The mock runs each batch in 2 s. Limits are the services' own (50,000 a batch
for OpenAI, 100,000 for Anthropic), so 100,000 rows are 2 batches and 1.
Prints one JSON line per API.
"""
import json, os, resource, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
fanout = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/fanout")
mock = str(Path(fanout).parent / "fanout-mock")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
d = tempfile.mkdtemp()
rows = os.path.join(d, "rows.jsonl")
with open(rows, "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"row-{i}", "essay": f"essay number {i} " + "lorem ipsum " * 8}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as answer:
        return json.load(answer)


def run(api: str) -> dict:
    port = free_port()
    server = subprocess.Popen([mock, "--port", str(port), "--batch-time-ms", "2000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                stats(port)
                break
            except OSError:
                time.sleep(0.05)
        base = f"http://127.0.0.1:{port}" + ("/v1" if api == "openai" else "")
        out = os.path.join(d, f"{api}.jsonl")
        command = [fanout, "--store", os.path.join(d, f"{api}.db"), "--provider", api,
                   "--base-url", base, "-q", "batch", rows, "--prompt", "Grade {{ essay }}",
                   "--id", "id", "--job", "bench", "-o", out, "--via", "batch-api",
                   "--poll-interval", "0.5"]
        env = dict(os.environ, OPENAI_API_KEY="sk-bench", ANTHROPIC_API_KEY="sk-ant-bench")
        t0 = time.perf_counter()
        child = subprocess.Popen(command, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        assert os.waitstatus_to_exitcode(status) == 0, f"fanout exited {status}"
        with open(out) as f:
            answered = sum(1 for line in f if '"succeeded"' in line)
        seen = stats(port)["batches"]
        return {"api": api, "rows": n, "answered": answered, "wall_s": round(wall, 2),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "batches": seen["created"],
                "submissions_per_row": round(seen["requests"] / n, 4),
                "most_submissions_of_a_row": seen["most_submissions"],
                "resubmitted": seen["resubmitted"]}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()


for api in ("openai", "anthropic"):
    print(json.dumps(run(api)), flush=True)
