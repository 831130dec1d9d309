"""Batched decode on the cpu backend, paired in one run: a max_batch=1 Decoder's single row, a max_batch=B
Decoder decoding B rows (aggregate tokens/s), and the same max_batch=B Decoder with one row (its idle slots'
cost), at full depth and under D3.

    python bench/cpu_batch_bench.py [--gguf PATH] [--threads 2] [--batch 8] [--tokens 16] [--reps 3]
                                    [--alpha 0.99] [--json OUT]

Method: each of --reps rounds runs every setting once, back to back, in an order that rotates each round.
A setting prefills its rows with the same short chat prompt (untimed), then times decode(--tokens) (greedy,
no host sync inside). Tokens/s = rows x tokens / that time; the table gives the median over rounds, and the
ratios are medians of each round's own ratio. One untimed warm-up of every setting first (it records the
step programs). Default model: the embedded SmolLM2-135M GGUF.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cpu_bench import commit  # noqa: E402  (this directory's side-by-side bench: the same commit label)

PROMPT = "What is the capital of France? Answer in one sentence."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="a GGUF file (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.99)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from d3kernels import D3Schedule, Decoder, cpu, load_model
    from d3kernels.generate import template_ids
    from d3kernels.model import embedded_model_path
    cpu.set_num_threads(args.threads)
    path = args.gguf or embedded_model_path()
    model = load_model(path, device="cpu")
    L = model.config.num_layers
    ids = template_ids(model.tokenizer, [{"role": "user", "content": PROMPT}])
    n, B = args.tokens, args.batch
    max_seq = len(ids) + n + 8
    settings = []
    for alpha in (1.0, args.alpha):
        sched = D3Schedule(L, alpha)
        one = Decoder(model, sched, max_batch=1, max_seq_len=max_seq, backend="cpu")
        many = Decoder(model, sched, max_batch=B, max_seq_len=max_seq, backend="cpu")
        settings += [(f"alpha {alpha:g}, max_batch 1, 1 row", one, 1, alpha),
                     (f"alpha {alpha:g}, max_batch {B}, {B} rows", many, B, alpha),
                     (f"alpha {alpha:g}, max_batch {B}, 1 row", many, 1, alpha)]

    def run(dec, rows) -> float:
        dec.prefill([ids] * rows)
        t = time.perf_counter()
        dec.decode(n)
        return rows * n / (time.perf_counter() - t)

    for _, dec, rows, _ in settings:   # warm-up: records each plan key's step program
        run(dec, rows)
    tps = {name: [] for name, *_ in settings}
    for rep in range(args.reps):
        order = settings[rep % len(settings):] + settings[:rep % len(settings)]
        got = {name: run(dec, rows) for name, dec, rows, _ in order}
        for k, v in got.items():
            tps[k].append(v)
        print(f"  round {rep + 1}: " + "; ".join(f"{k} {v:.1f}" for k, v in got.items()), flush=True)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(tps[a], tps[b]))

    print(f"\n{os.path.basename(path)}: {L} layers; {datetime.date.today()}, commit {commit()}, "
          f"{platform.processor() or platform.machine()}, isa {cpu.isa()}, {args.threads} threads, {n} greedy "
          f"tokens after a {len(ids)}-token prompt, {args.reps} rounds (median, min-max)")
    rows_out = []
    for alpha in (1.0, args.alpha):
        base = f"alpha {alpha:g}, max_batch 1, 1 row"
        for name, _, rows, a in settings:
            if a != alpha:
                continue
            v = tps[name]
            r = ratio(name, base)
            print(f"  {name:36s} {statistics.median(v):7.1f} tok/s ({min(v):.1f}-{max(v):.1f})  "
                  f"{r:5.2f}x the single row")
            rows_out.append({"setting": name, "alpha": alpha, "rows": rows, "tok_s": statistics.median(v),
                             "all": v, "vs_single_row": r})
    if args.json:
        with open(args.json, "a") as f:
            for r in rows_out:
                f.write(json.dumps({"model": os.path.basename(path), "date": str(datetime.date.today()),
                                    "commit": commit(), "threads": args.threads, **r}) + "\n")


if __name__ == "__main__":
    main()
