"""The batched prefill (d3kernels/prefill.py, what the driver runs) against its row-by-row specification
(d3kernels.reference.prefill), on the embedded SmolLM2-135M or a model given with --model.

    python bench/prefill_bench.py [--device cpu|cuda] [--dtypes fp32,bf16] [--rows 1,4] [--runs 3]

Median of --runs after one warm-up; host clock on the CPU, CUDA events on a GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from d3kernels import encode_prompt, load_model
from d3kernels import reference as ref
from d3kernels.model import rope_tables
from d3kernels.prefill import prefill

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, dev) -> float:
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1000
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    print("| dtype | rows | prompt tokens | reference.prefill | prefill (batched) | gain |\n|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dt = DTYPES[name]
        m = load_model(args.model, device=dev, dtype=dt)
        cfg = m.config
        prompt = encode_prompt(m, "Write a short story about a lighthouse keeper who finds a message in a bottle.")
        for B in (int(x) for x in args.rows.split(",")):
            lengths = [len(prompt) - 3 * b for b in range(B)]
            ids = torch.tensor([prompt[:n] + [0] * (max(lengths) - n) for n in lengths], device=dev)
            S = max(lengths) + 16
            cos, sin = rope_tables(cfg, S, dev)
            res = {}
            for label, fn in (("reference", ref.prefill), ("batched", prefill)):
                k = torch.zeros(cfg.num_layers, B, cfg.kv_heads, S, cfg.head_dim, dtype=dt, device=dev)
                v, h = torch.zeros_like(k), torch.empty(B, cfg.hidden, dtype=dt, device=dev)
                valid = torch.zeros(cfg.num_layers, B, S, dtype=torch.uint8, device=dev)
                ts = [timed(lambda: fn(h, ids, lengths, m.weights, k, v, valid, cos, sin, cfg.eps), dev)
                      for _ in range(args.runs + 1)]
                res[label] = statistics.median(ts[1:])
            print(f"| {name} | {B} | {lengths} | {1000 * res['reference']:.1f} ms | {1000 * res['batched']:.1f} ms | "
                  f"{res['reference'] / res['batched']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
