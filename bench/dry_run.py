"""Benchmark: `fanout batch --dry-run` over a large file, beside a Python peer.

fanout renders every row's prompt with the batch's template and counts its
tokens with gpt-4o-mini's tokenizer (o200k_base, tiktoken-rs), with no call.
The peer is what a careful Python user writes for the same estimate: read the
JSONL, render the prompt, count the chat tokens with OpenAI's `tiktoken`
(given the same o200k_base file, since this machine cannot download it).
Both report rows per second and peak RSS; the two token totals must agree.

    python3 bench/dry_run.py [ROWS]        (default: 1000000)

Needs `pip install tiktoken` for the peer (skipped without it).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FANOUT = ROOT / "target/release/fanout"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

PEER = r'''
import json, sys, tiktoken
enc = tiktoken.get_encoding("o200k_base")
rows = calls = tokens = 0
with open(sys.argv[1]) as f:
    for line in f:
        rows += 1
        try:
            row = json.loads(line)
            prompt = "Grade this essay: " + row["essay"]
        except (ValueError, KeyError):
            continue
        calls += 1
        # OpenAI's chat framing: 3 per message, 1 for the role, 3 for the reply.
        tokens += 3 + len(enc.encode("user")) + len(enc.encode(prompt)) + 3
print(json.dumps({"rows": rows, "calls": calls, "input_tokens": tokens}))
'''


def write_rows(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            essay = f"Essay number {i}: the sea at dawn, grey and patient, and the boats going out."
            f.write(json.dumps({"id": f"row-{i}", "essay": essay}) + "\n")


def measured(command: list[str], env=None) -> tuple[float, float, dict]:
    """Runs a command; returns (wall seconds, peak RSS in MB, its JSON output)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {command}")
    return wall, usage.ru_maxrss / 1024, json.loads(out)


def tiktoken_cache(tmp: Path) -> Path | None:
    """A tiktoken cache holding tiktoken-rs's own o200k_base file."""
    assets = list(Path.home().glob(".cargo/registry/src/*/tiktoken-rs-*/assets/o200k_base.tiktoken"))
    if not assets:
        return None
    cache = tmp / "tiktoken"
    cache.mkdir()
    shutil.copy(assets[0], cache / hashlib.sha1(O200K_URL.encode()).hexdigest())
    return cache


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "fanout-cli"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = tmp / "rows.jsonl"
        write_rows(rows, n)
        size = rows.stat().st_size / 1e6
        print(f"{n:,} rows, {size:.0f} MB\n")
        print("| tool | wall s | rows/s | peak RSS MB | input tokens |")
        print("| --- | --- | --- | --- | --- |")
        fanout = [str(FANOUT), "--provider", "openai", "--model", "gpt-4o-mini", "--max-tokens", "64",
                  "--store", str(tmp / "fanout.db"), "--json", "batch", str(rows),
                  "--prompt", "Grade this essay: {{ essay }}", "--id", "id", "--dry-run"]
        wall, rss, report = measured(fanout)
        print(f"| fanout --dry-run (tiktoken-rs) | {wall:.1f} | {n / wall:,.0f} | {rss:.0f} | "
              f"{report['input_tokens']:,} |", flush=True)
        cache = tiktoken_cache(tmp)
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            cache = None
        if cache is None:
            print("| Python + tiktoken | skipped: `pip install tiktoken` | | | |")
            return
        env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache))
        wall, rss, peer = measured([sys.executable, "-c", PEER, str(rows)], env=env)
        print(f"| Python + tiktoken | {wall:.1f} | {n / wall:,.0f} | {rss:.0f} | {peer['input_tokens']:,} |")
        if peer["input_tokens"] != report["input_tokens"]:
            sys.exit(f"the counts differ: fanout {report['input_tokens']}, peer {peer['input_tokens']}")


if __name__ == "__main__":
    main()
