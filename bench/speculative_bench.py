"""Lossless D3 on the CPU: per draft schedule and k, acceptance, tokens per round, draft and verify cost in
layer passes per token, and real tokens/s against plain full-depth decoding, in one run; beside it the
memory-bound cost model's prediction (d3kernels.speed.speculative_speedup) and break-even acceptance.

    python bench/speculative_bench.py [--tokens 64] [--prompts 2] [--alphas 0.99,0.97,0.95] [--ks 1,2,4]
                                      [--backend reference|cpu] [--model PATH] [--threads N]

With --backend cpu the model's weights stay as the file stores them (GGUF blocks, no --dtype).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from d3kernels import D3Schedule, Decoder, load_model
from d3kernels.calibrate import builtin_prompts, encode_prompts
from d3kernels.speed import break_even_acceptance, speculative_speedup, tokens_per_round


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--alphas", default="0.99,0.97,0.95")
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--json", default=None, help="write the rows here too")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: fp32 on a CPU, bf16 on a GPU)")
    ap.add_argument("--backend", default="reference")
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.backend == "cpu":
            from d3kernels import cpu
            cpu.set_num_threads(args.threads)
    if args.backend == "cpu" and args.dtype is None:
        dtype = None     # the weights as stored, read by the cpu backend
        model = load_model(args.model, device=args.device)
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype or ("fp32" if args.device == "cpu" else "bf16")]
        model = load_model(args.model, device=args.device, dtype=dtype)
    cfg, L = model.config, model.config.num_layers
    rows = encode_prompts(model, builtin_prompts()[: args.prompts])
    S = max(len(r) for r in rows) + args.tokens + 1
    n = args.tokens

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(sched, k=None):
        dec = Decoder(model, sched, max_seq_len=S, backend=args.backend)
        toks, secs, stats = [], 0.0, []
        for r in rows:
            dec.generate([r], 4, ignore_eos=True, speculative=k)          # warm-up
            sync()
            t = time.perf_counter()
            g = dec.generate([r], n, ignore_eos=True, speculative=k)
            sync()
            secs += time.perf_counter() - t
            toks.append(g.tokens[0].tolist())
            stats.append(g.speculation)
        return toks, len(rows) * n / secs, stats

    base, base_tps, _ = run(D3Schedule(L, alpha=1.0))
    out = [{"setting": "full depth", "tokens_per_s": base_tps}]
    print(f"full depth: {base_tps:.2f} tokens/s ({len(rows)} prompts x {n} tokens, {str(dtype)[6:] if dtype else 'packed'} "
          f"{args.backend} on {args.device}, {torch.get_num_threads()} threads)")
    print("alpha  k  accept  tok/round  draft/tok  verify/tok  tok/s  vs full  same | model: at accept  at 0.8  "
          "at 0.9  break-even")
    for a in (float(x) for x in args.alphas.split(",")):
        for k in (int(x) for x in args.ks.split(",")):
            sched = D3Schedule(L, alpha=a)
            toks, tps, stats = run(sched, k)
            same = toks == base     # exact in fp32 on the reference; 16-bit verify and decode may round apart
            if args.device == "cpu" and dtype == torch.float32:
                assert same, f"alpha {a} k {k}: not lossless"
            acc = sum(s["accepted"] for s in stats) / sum(s["drafted"] for s in stats)
            rounds = sum(s["rounds"] for s in stats)
            emitted = len(rows) * (n - 1)
            draft = sum(s["draft_layer_passes"] for s in stats) / emitted
            verify = sum(s["verify_layer_passes"] for s in stats) / emitted
            ctx, i = len(rows[0]) + n // 2, n // 2
            es = torch.empty((), dtype=dtype).element_size()
            pred = [speculative_speedup(cfg, sched, k, x, i, ctx, es) for x in (acc, 0.8, 0.9)]
            be = break_even_acceptance(cfg, sched, k, i, ctx, es)
            row = {"alpha": a, "k": k, "acceptance": acc, "tokens_per_round": emitted / rounds,
                   "draft_layer_passes_per_token": draft, "verify_layer_passes_per_token": verify,
                   "tokens_per_s": tps, "speedup": tps / base_tps, "predicted_at_measured_acceptance": pred[0],
                   "predicted_at_0.8": pred[1], "predicted_at_0.9": pred[2], "break_even_acceptance": be,
                   "expected_tokens_per_round_at_measured": tokens_per_round(acc, k), "identical_tokens": same}
            out.append(row)
            print(f"{a:5.3f} {k:2d}  {acc:6.2f}  {emitted / rounds:9.2f}  {draft:9.1f}  {verify:10.1f}  {tps:5.2f}  "
                  f"{tps / base_tps:6.2f}x  {'yes' if same else 'NO '}  |        {pred[0]:5.2f}x  {pred[1]:5.2f}x  {pred[2]:5.2f}x  {be:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
