"""How much D3 keeps under continuous batching: Poisson arrivals, rows at different D3 steps.

A step of a batch runs the union of its rows' kept sets, which is the youngest row's (the sets are
nested), so newcomers pull the whole batch back to full depth for their first steps. Two measurements:

- `--simulate` (schedule only, no model, any machine): arrivals per decode step ~ Poisson(rate), each
  request generates n tokens, at most B run at once (the rest wait). Per step: the union depth, the
  rows' own mean depth. The saving that survives is L / mean union depth (a step reads the weights of
  the union's layers once for all rows), against the single-stream ideal L / mean kept depth.
- default: a real d3kernels.Server run (tokens/s, D3 against full depth, same arrivals); on the CPU
  with the reference backend its times mean nothing (a smoke test), on a GPU they are the figures.

    python bench/serving_bench.py --simulate [--tokens 256] [--json OUT]
    python bench/serving_bench.py [--model PATH] [--backend auto] [--batches 8,32] [--tokens 128]
                                  [--page-size 16]     # the paged KV cache (pool: every slot's full length)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from d3kernels import D3Schedule

# (name, L) of the shapes the project targets; the schedule is the library default unless given
MODELS = [("SmolLM2-135M", 30), ("Llama-3.2-1B", 16), ("Llama-3-8B", 32)]


def simulate(schedule: D3Schedule, B: int, rate: float, n_tokens: int, steps: int = 4000, seed: int = 0) -> dict:
    """Queueing simulation in decode steps. rate: mean arrivals per step. Returns mean union depth,
    mean row depth, mean live rows, and the depth ratios."""
    rng = np.random.default_rng(seed)
    L = schedule.num_layers
    queue, live = 0, []                       # live: each row's step index i (1 = first decode step)
    union, rows, busy = [], [], []
    for t in range(steps):
        queue += rng.poisson(rate)
        while queue and len(live) < B:        # admitted rows are prefilled, then decode from i = 1
            live.append(1)
            queue -= 1
        if live:
            depths = [schedule.num_kept(i) for i in live]
            if t >= steps // 10:              # drop the warm-up
                union.append(max(depths))     # nested sets: the union is the deepest (youngest) row's
                rows.append(sum(depths) / len(depths))
                busy.append(len(live))
        live = [i + 1 for i in live if i + 1 < n_tokens]
    mu, mr = float(np.mean(union)), float(np.mean(rows))
    ideal = L / (sum(schedule.num_kept(i) for i in range(1, n_tokens)) / (n_tokens - 1))
    return {"B": B, "rate": rate, "load": rate * (n_tokens - 1) / B, "mean_live": float(np.mean(busy)),
            "mean_union_depth": mu, "mean_row_depth": mr, "kept_ratio": L / mu, "ideal_ratio": ideal,
            "kept_fraction_of_saving": (L / mu - 1) / (ideal - 1) if ideal > 1 else float("nan")}


def simulate_table(n_tokens: int, loads=(0.5, 0.9, 1.5), batches=(1, 8, 32), alpha=0.998, start=0.5,
                   tail=1) -> list:
    out = []
    for name, L in MODELS:
        sched = D3Schedule(L, alpha=alpha, start=start, tail=tail)
        for B in batches:
            for load in loads:
                r = simulate(sched, B, load * B / (n_tokens - 1), n_tokens)
                out.append({"model": name, "L": L, **r})
    return out


def run(model, schedule, B: int, rate: float, n_tokens: int, n_requests: int, backend: str, seed: int = 0,
        page_size=None) -> dict:
    """A real Server run with Poisson arrivals (per step); returns tokens/s and depths. page_size: run on a
    paged KV cache."""
    from d3kernels import Server
    rng = np.random.default_rng(seed)
    server = Server(model, schedule, max_batch=B, max_seq_len=64 + n_tokens, backend=backend, page_size=page_size)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.config.vocab, (16,), generator=g).tolist() for _ in range(n_requests)]
    sync = torch.cuda.synchronize if server.core.device.type == "cuda" else (lambda: None)
    queue, added, tokens = 0, 0, 0
    sync()
    t0 = time.perf_counter()
    while added < n_requests or server.live:
        queue += rng.poisson(rate)
        while queue and added < n_requests and len(server.live) < B:
            server.add(prompts[added], max_new_tokens=n_tokens, ignore_eos=True)
            added += 1
            queue -= 1
            tokens += 1
        tokens += len(server.step())
    sync()
    dt = time.perf_counter() - t0
    st = server.stats()
    return {"B": B, "rate": rate, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, **st}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--load", type=float, default=0.9, help="offered load: arrivals x tokens / slots")
    p.add_argument("--page-size", type=int, default=None, help="serve from a paged KV cache")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.simulate:
        rows = simulate_table(a.tokens)
        print(f"D3 under continuous batching (simulated; alpha 0.998, start 0.5, tail 1, {a.tokens} tokens per "
              "request, Poisson arrivals; load = arrival rate x tokens / slots)")
        print("| model | B | load | live rows | union depth | row depth | kept ratio | single-stream ideal | "
              "share of the saving kept |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['model']} (L={r['L']}) | {r['B']} | {r['load']:.1f} | {r['mean_live']:.1f} | "
                  f"{r['mean_union_depth']:.2f} | {r['mean_row_depth']:.2f} | {r['kept_ratio']:.3f}x | "
                  f"{r['ideal_ratio']:.3f}x | {r['kept_fraction_of_saving'] * 100:.0f}% |")
    else:
        from d3kernels import load_model
        model = load_model(a.model) if a.model else load_model()
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        if model.device.type != dev:
            model = load_model(a.model, device=dev) if a.model else load_model(device=dev)
        L = model.config.num_layers
        rows = []
        for B in (int(x) for x in a.batches.split(",")):
            rate = a.load * B / (a.tokens - 1)
            for name, sched in (("full depth", D3Schedule(L, alpha=1.0)), ("D3 0.998", D3Schedule(L))):
                r = run(model, sched, B, rate, a.tokens, a.requests, a.backend, page_size=a.page_size)
                rows.append({"setting": name, "page_size": a.page_size, **r})
                print(f"B={B} {name}{'' if a.page_size is None else f' (pages of {a.page_size})'}: "
                      f"{r['tokens_per_s']:.1f} tokens/s, union depth {r['mean_step_depth']:.2f}, "
                      f"row depth {r['mean_row_depth']:.2f}, {r['graphs']} graphs, backend {r['backend']}",
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
