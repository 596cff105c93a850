"""Benchmark: the seed's Python code (bench/peer.py: asyncio.gather over the
openai SDK) straight at fanout-mock, and the same code unchanged through
`fanout proxy`, in one run.

    python3 bench/proxy.py [--n 3000] [--concurrency 200] [--latency-calls 2000]

- ratelimit: N calls, C at once, against a mock allowing 100 requests a second
  (ideal: N / 100 s): failures and wall time, direct and through the proxy
  (the proxy is given no limit: it learns the server's from its 429s);
- latency:   calls one at a time against an unlimited mock answering at once,
  direct and through the proxy: the proxy's added latency at p50 / p99, and
  the proxy's CPU per call (from /proc).
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import MOCK, ROOT, Mock, ensure_openai, measured  # noqa: E402

FANOUT = ROOT / "target/release/fanout"
PEER = ROOT / "bench/peer.py"


class Proxy:
    def __init__(self, upstream: str, directory: str, flags: list[str]):
        env = dict(os.environ, FANOUT_HOME=directory)
        self.process = subprocess.Popen(
            [str(FANOUT), "--provider", "openai", "--base-url", upstream + "/v1", *flags,
             "proxy", "--listen", "127.0.0.1:0"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        line = self.process.stderr.readline()
        self.url = line.split()[2].removesuffix("/chat/completions")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def peer(base_url: str, n: int, concurrency: int) -> dict:
    return measured([sys.executable, str(PEER), "--base-url", base_url, "--n", str(n),
                     "--concurrency", str(concurrency)])


def latencies(base_url: str, calls: int) -> list[float]:
    from openai import AsyncOpenAI

    async def run() -> list[float]:
        client = AsyncOpenAI(base_url=base_url, api_key="sk-bench")
        seen = []
        for i in range(calls):
            start = time.perf_counter()
            await client.chat.completions.create(
                model="mock-1", messages=[{"role": "user", "content": f"Say {i}."}])
            seen.append((time.perf_counter() - start) * 1000)
        return seen

    return asyncio.run(run())


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency-calls", type=int, default=2000)
    args = parser.parse_args()
    ensure_openai()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "fanout-cli", "-p", "fanout-mock"],
                   cwd=ROOT, check=True)
    assert MOCK.exists() and FANOUT.exists()
    ideal = args.n / 100
    import tempfile

    print(f"ratelimit: {args.n} calls, {args.concurrency} at once, server 100 req/s (ideal {ideal:.0f} s)")
    for how in ["direct", "proxy"]:
        mock = Mock(["--rpm", "6000"])
        with tempfile.TemporaryDirectory() as directory:
            proxy = Proxy(mock.url, directory, ["-c", str(args.concurrency)]) if how == "proxy" else None
            url = proxy.url if proxy else mock.url + "/v1"
            result = peer(url, args.n, args.concurrency)
            server = mock.stats()
            if proxy:
                proxy.close()
        mock.close()
        print(json.dumps({"how": how, "succeeded": result["succeeded"], "failed": result["failed"],
                          "errors": result.get("errors"), "wall_s": round(result["wall_s"], 2),
                          "x_ideal": round(result["wall_s"] / ideal, 3),
                          "server_429s": server.get("by_status", {}).get("429", 0)}))

    print(f"latency: {args.latency_calls} calls one at a time, unlimited server answering at once")
    mock = Mock([])
    direct = latencies(mock.url + "/v1", args.latency_calls)
    with tempfile.TemporaryDirectory() as directory:
        proxy = Proxy(mock.url, directory, [])
        latencies(proxy.url, 50)  # warm the proxy's connections
        cpu_before = proxy.cpu_seconds()
        proxied = latencies(proxy.url, args.latency_calls)
        cpu = proxy.cpu_seconds() - cpu_before
        proxy.close()
    mock.close()
    for q in [0.5, 0.99]:
        d, p = quantile(direct, q), quantile(proxied, q)
        print(json.dumps({"quantile": q, "direct_ms": round(d, 3), "proxy_ms": round(p, 3),
                          "added_ms": round(p - d, 3)}))
    print(json.dumps({"proxy_cpu_ms_per_call": round(cpu * 1000 / args.latency_calls, 3)}))


if __name__ == "__main__":
    main()
