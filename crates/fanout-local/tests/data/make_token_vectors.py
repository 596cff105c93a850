"""Reference token ids for SmolLM2's tokenizer, computed by llama.cpp.

An independent implementation: llama.cpp's own GGUF vocabulary code, through the
llama-cpp-python package (vocab_only: no weights are loaded). Run once and commit
the output; fanout's tokenizer tests compare against it.

    pip install llama-cpp-python
    python3 make_token_vectors.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf > smollm2_tokens.json
"""
import json
import sys

from llama_cpp import Llama

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading spaces and trailing  ",
    "Numbers: 12345, 3.14159 and 1,000,000.",
    "don't won't I'll we've they're she's it'd",
    "Tabs\tand\nnew\n\nlines\r\n",
    "émigré café naïve Zürich",
    "日本語のテキスト and 中文",
    "emoji 🎉🚀 done",
    "code: fn main() { println!(\"hi\"); }",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "x" * 40 + " " + "ab" * 20,
    "MiXeD CaSe WORDS and UPPER",
    "   ",
    "a\u00a0b\u2003c",
]

llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
vectors = []
for text in TEXTS:
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    vectors.append({"text": text, "ids": ids})
# One vector per line: diffs stay readable.
print("[")
print(",\n".join(json.dumps(v, ensure_ascii=False) for v in vectors))
print("]")
