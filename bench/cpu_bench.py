"""The embedded SmolLM2-135M GGUF on the CPU, side by side in one run: d3kernels (the native cpu backend on the
weights as stored, and the reference backend on the dequantized float32 weights, each at full depth and the
default alpha), HF transformers on the same GGUF, and llama.cpp on the same file (llama-cpp-python;
skipped with the reason when it is not installed). Greedy decode tokens/s after one chat prompt (prefill
excluded: a run of n tokens minus a run of 1), bytes read per token and their fraction of the machine's
measured read bandwidth, and D3's real ratio against its ideal.

    python bench/cpu_bench.py [--tokens 64] [--llama-python /path/to/venv/bin/python]

llama.cpp runs in this process when `llama_cpp` imports, else in the interpreter given by --llama-python or
D3K_LLAMA_PYTHON (a venv with `CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from d3kernels import D3Schedule, Decoder, load_model
from d3kernels.generate import template_ids
from d3kernels.model import embedded_model_path
from d3kernels.speed import ideal_speedup, step_bytes

PROMPT = "What is the capital of France? Answer in one sentence, then name three other European capitals."

_LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
path, ids, n, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
def run(m):
    llm.reset()
    t = time.perf_counter()
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) >= m:
            break
    return time.perf_counter() - t, out
run(4)
best = None
for _ in range(3):
    t1, _ = run(1)
    tn, out = run(n)
    best = max(best or 0, (n - 1) / (tn - t1))
print(json.dumps({"tokens_per_s": best, "tokens": out}))
"""


def read_bandwidth() -> float:
    """GB/s of a streaming read: torch sum over 1 GiB of float32 (median of 5)."""
    x = torch.ones(2 ** 28)
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return 2 ** 30 / sorted(ts[1:])[2] / 1e9


def decode_rate(run, n: int, reps: int = 3) -> float:
    """Best of reps of (n - 1) tokens / (time of n tokens - time of 1 token)."""
    run(2)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        run(1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        run(n)
        best = max(best, (n - 1) / (time.perf_counter() - t - t1))
    return best


def packed_step_bytes(model, kept: int, context: int) -> int:
    """Bytes one decode step of the cpu backend reads: `kept` layers' matrices as stored (q4_1 here) and
    norms, their K/V over `context` positions (float32), the lm_head as stored (q8_0) and one embedding row."""
    cfg, w = model.config, model.weights
    layer = sum(getattr(w, k)[0].nbytes for k in ("wqkv", "wo", "w_gate_up", "w_down")) + 2 * cfg.hidden * 4
    kv = 2 * cfg.kv_heads * cfg.head_dim * 4 * context
    head = w.lm_head.nbytes + cfg.hidden * 4
    return kept * (layer + kv) + head + w.embed.nbytes // cfg.vocab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--llama-python", default=os.environ.get("D3K_LLAMA_PYTHON"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n, threads = args.tokens, torch.get_num_threads()
    bw = read_bandwidth()
    model = load_model()
    cfg, L = model.config, model.config.num_layers
    ids = template_ids(model.tokenizer, [{"role": "user", "content": PROMPT}])
    gguf_bytes = os.path.getsize(embedded_model_path())
    rows = []

    def add(engine, tps, bytes_per_token, note=""):
        frac = tps * bytes_per_token / 1e9 / bw if tps and bytes_per_token else None
        rows.append({"engine": engine, "tokens_per_s": tps, "bytes_per_token": bytes_per_token,
                     "fraction_of_read_bw": frac, "note": note})
        shown = f"{tps:7.1f}" if tps else "   skip"
        print(f"{engine:42s} {shown} tok/s  {bytes_per_token / 1e6 if bytes_per_token else 0:7.1f} MB/token  "
              f"{frac if frac else 0:6.1%} of {bw:.1f} GB/s  {note}", flush=True)

    print(f"{threads} threads, prompt {len(ids)} tokens, {n} greedy tokens; read bandwidth {bw:.1f} GB/s")
    dense = model.dequantized(torch.float32)
    for backend, m in (("cpu", model), ("reference", dense)):
        base = None
        for alpha in (1.0, D3Schedule(L).alpha):
            sched = D3Schedule(L, alpha=alpha)
            dec = Decoder(m, sched, max_seq_len=len(ids) + n + 1, backend=backend)
            tps = decode_rate(lambda k: dec.generate([ids], k, ignore_eos=True), n)
            layers = [len(sched.kept_layers(i)) for i in range(n)]
            if backend == "cpu":
                per = [packed_step_bytes(m, k, len(ids) + i) for i, k in enumerate(layers) if i]
                full = [packed_step_bytes(m, L, len(ids) + i) for i in range(1, n)]
                ideal = sum(full) / sum(per)
            else:
                per = [step_bytes(cfg, k, len(ids) + i, 4) for i, k in enumerate(layers) if i]
                ideal = ideal_speedup(cfg, layers, len(ids), 4)
            nbytes = sum(per) / (n - 1)
            note = ""
            if alpha == 1.0:
                base = tps
            else:
                note = f"{sum(layers[1:]) / (n - 1):.1f} of {L} layers; D3 {tps / base:.2f}x, ideal {ideal:.2f}x"
            what = "cpu backend (q4_1 + q8_0 as stored)" if backend == "cpu" else "reference fp32"
            add(f"d3kernels {what}, alpha {alpha}", tps, nbytes, note)

    try:
        import transformers
        path = embedded_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               dtype=torch.float32)
        t_ids = torch.tensor([ids])
        tps = decode_rate(lambda m: hf.generate(t_ids, max_new_tokens=m, min_new_tokens=m, do_sample=False), n)
        add("HF transformers fp32 (same GGUF, dequantized)", tps,
            sum(p.numel() * p.element_size() for p in hf.parameters()), "weights once per token")
    except Exception as e:         # noqa: BLE001 (a peer that cannot run is reported, not fatal)
        add("HF transformers fp32 (same GGUF, dequantized)", None, None, f"skipped: {type(e).__name__}: {e}")

    res, why = None, None
    try:
        import llama_cpp  # noqa: F401
        py = sys.executable
    except ImportError:
        py = args.llama_python
        why = None if py else "llama_cpp is not installed (pip install llama-cpp-python, or --llama-python)"
    if py:
        r = subprocess.run([py, "-c", _LLAMA, embedded_model_path(), json.dumps(ids), str(n), str(threads)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            res = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            why = "llama.cpp failed: " + r.stderr.strip().splitlines()[-1][:200]
    add(f"llama.cpp Q4_1 (same GGUF), {threads} threads", res and res["tokens_per_s"], gguf_bytes if res else None,
        why or "the whole file once per token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_bw_gbps": bw, "threads": threads, "tokens": n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
