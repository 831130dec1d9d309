"""Where a cpu-backend decode step's time goes, by phase, on a GGUF file (default: the embedded model).

    python bench/cpu_profile.py [--gguf PATH] [--threads 2] [--context 512] [--reps 30]

Times each op of one decode step alone (eager launches, batch 1, median of --reps, after a warm-up):
attn_block of every layer (QKV GEMV, RoPE, attention over --context positions, o-projection), mlp_block of
every layer (gate / up and down GEMVs), lm_head; with the bytes each reads (weights as stored, plus the
K/V it attends to) and the GB/s that makes. Then a whole recorded decode step (Decoder.decode), so the
difference is what the step adds (barriers between ops, sampling, Python). The read bandwidth (torch sum
over 1 GiB) is measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3kernels  # noqa: E402
from d3kernels import cpu, quant  # noqa: E402
from d3kernels.decoder import Decoder  # noqa: E402
from d3kernels.model import rope_tables  # noqa: E402
from d3kernels.schedule import D3Schedule  # noqa: E402


def read_bandwidth(gib: float = 1.0) -> float:
    """GB/s of torch.sum over a float32 buffer of `gib` GiB (the best of 5)."""
    a = torch.ones(int(gib * 2 ** 30) // 4)
    a.sum()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return best


def median_us(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def nbytes(w) -> int:
    return sum(quant.storage(w).values())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cpu.set_num_threads(a.threads)
    m = d3kernels.load_model(a.gguf, packed=True)
    cfg, w = m.config, m.weights
    d, H, Hkv, D, S = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, a.context + 1
    cos, sin = rope_tables(cfg, S)
    h = torch.randn(1, d)
    out = torch.empty(1, d)
    k = torch.randn(1, Hkv, S, D) * 0.1
    v = torch.randn(1, Hkv, S, D) * 0.1
    valid = torch.ones(1, S, dtype=torch.uint8)
    pos = torch.tensor([a.context], dtype=torch.int32)
    act = torch.ones(1, dtype=torch.uint8)
    logits = torch.empty(1, cfg.vocab)
    bw = read_bandwidth()
    rows = []
    attn_us = mlp_us = 0.0
    attn_b = mlp_b = 0
    kv_bytes = 2 * Hkv * a.context * D * 4
    for l in range(cfg.num_layers):
        lw = w.layers[l]
        ta = median_us(lambda: cpu.ops.attn_block(out, h, lw.attn_norm, lw.wqkv, lw.bqkv, lw.wo, k, v, valid, pos, cos,
                                                  sin, act, cfg.eps), a.reps)
        tm = median_us(lambda: cpu.ops.mlp_block(out, h, lw.mlp_norm, lw.w_gate_up, lw.w_down, act, cfg.eps), a.reps)
        ba, bm = nbytes(lw.wqkv) + nbytes(lw.wo) + kv_bytes, nbytes(lw.w_gate_up) + nbytes(lw.w_down)
        attn_us, mlp_us, attn_b, mlp_b = attn_us + ta, mlp_us + tm, attn_b + ba, mlp_b + bm
    th = median_us(lambda: cpu.ops.lm_head(logits, h, w.final_norm, w.lm_head, cfg.eps), a.reps)
    bh = nbytes(w.lm_head)
    for name, us, b in (("attn_block (all layers)", attn_us, attn_b), ("mlp_block (all layers)", mlp_us, mlp_b),
                        ("lm_head", th, bh)):
        rows.append({"phase": name, "us": us, "bytes": b, "GB/s": b / us / 1e3, "of_read_bw": b / us / 1e3 / bw})
    ops_us, ops_b = attn_us + mlp_us + th, attn_b + mlp_b + bh
    dec = Decoder(m, D3Schedule(cfg.num_layers, alpha=1.0), max_seq_len=a.context + 80, backend="cpu")
    dec.prefill([[1] * a.context])
    dec.decode(4)
    t = time.perf_counter()
    n = 32
    dec.decode(n)
    step_us = (time.perf_counter() - t) / n * 1e6
    rows.append({"phase": "sum of the ops", "us": ops_us, "bytes": ops_b, "GB/s": ops_b / ops_us / 1e3,
                 "of_read_bw": ops_b / ops_us / 1e3 / bw})
    rows.append({"phase": "recorded decode step", "us": step_us, "bytes": ops_b, "GB/s": ops_b / step_us / 1e3,
                 "of_read_bw": ops_b / step_us / 1e3 / bw})
    print(f"model {m.source}: storage {quant.storage(w.wqkv)} ...; read bandwidth {bw:.1f} GB/s; "
          f"{a.threads} threads; context {a.context}; isa {cpu.isa()}")
    for r in rows:
        print(f"  {r['phase']:26s} {r['us']:9.0f} us  {r['bytes'] / 1e6:8.1f} MB  {r['GB/s']:6.1f} GB/s  "
              f"{100 * r['of_read_bw']:5.1f}% of read BW")
    print(f"  step overhead beyond the ops: {step_us - ops_us:.0f} us ({100 * (step_us - ops_us) / step_us:.1f}%)")
    return {"read_bw": bw, "rows": rows}


if __name__ == "__main__":
    main()
