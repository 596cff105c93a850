"""llama.cpp's single-request decode and prompt-processing speeds on the same GGUF, for BENCHMARKS.md.

Runs in the same session as `cargo run --release -p fanout-local --example local_throughput`
so the two figures share the machine's state (this machine is shared and noisy).

    pip install llama-cpp-python
    (on a CPU with AMX, build it with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
    -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF": the native build's AMX
    matmul crashed with SIGSEGV on this project's machines)
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

# Prompt processing of one ~390-token prompt, as local_throughput's `prefill`
# scenario measures (prompt tokens over the time to the first token's logits).
passage = " ".join(f"Sentence {i} of the passage tells of rivers, hills and the towns between them." for i in range(24))
long_ids = llm.tokenize(f"<|im_start|>user\n{passage}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True)
prefill = []
for _ in range(3):
    llm.reset()
    started = time.perf_counter()
    llm.eval(long_ids)
    prefill.append(len(long_ids) / (time.perf_counter() - started))
print(f"llama.cpp prefill: one {len(long_ids)}-token prompt alone: {max(prefill):.1f} tok/s (best of 3)")
