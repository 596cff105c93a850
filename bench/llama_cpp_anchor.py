"""llama.cpp's single-request decode speed on the same GGUF, for BENCHMARKS.md.

Runs in the same session as `cargo run --release -p fanout-local --example local_throughput`
so the two figures share the machine's state (this machine is shared and noisy).

    pip install llama-cpp-python
    python3 bench/llama_cpp_anchor.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf [threads] [tokens]
"""
import sys
import time

from llama_cpp import Llama

path = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
llm = Llama(model_path=path, n_threads=threads, n_ctx=1024, verbose=False)
prompt = "<|im_start|>user\nWrite a short story about rivers number 0.<|im_end|>\n<|im_start|>assistant\n"
ids = llm.tokenize(prompt.encode(), special=True)
rates = []
for _ in range(3):
    llm.reset()
    started = time.perf_counter()
    llm.eval(ids)
    first = None
    for i in range(tokens):
        token = llm.sample(temp=0.7, top_p=0.9)
        if first is None:
            first = time.perf_counter()
        llm.eval([token])
    ended = time.perf_counter()
    rates.append((tokens - 1) / (ended - first))
    ttft = (first - started) * 1000
print(f"llama.cpp (llama-cpp-python), {threads} threads, batch 1: decode {max(rates):.1f} tok/s (best of 3), TTFT {ttft:.0f} ms")
