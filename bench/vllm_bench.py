"""vLLM with D3 (d3kernels' plugin) against stock vLLM, on one model, in one run.

Runs inside the vLLM venv (scripts/vllm_venv.sh), e.g. on the CPU:

    .venv-vllm/bin/python bench/vllm_bench.py                        # the embedded SmolLM2, fp32, eager
    .venv-vllm/bin/python bench/vllm_bench.py --model DIR --dtype bfloat16 --compiled   # a GPU machine

For each setting (stock vLLM, then D3 at each --alphas value) it starts one engine and measures:
  single   one request at a time, --tokens greedy tokens (ignore_eos), median of --repeats, tokens/s;
  poisson  --requests requests arriving as a Poisson process of --rate requests/s, --tokens each:
           generated tokens / makespan;
and from the plugin's per-forward trace: the mean layers per generated token (D3's own count, N_i per token,
T_0 = L) and the mean layers a decode forward called (the batch's union kept set: what the hardware ran).
Wall-clock figures come from the host clock around engine.step() (the engine core runs in this process).
--json writes everything. Needs the d3kernels package in the same venv (it exports the embedded model).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def export_embedded(dtype: str) -> str:
    from d3kernels.model import load_model, save_hf, user_cache_dir
    path = os.path.join(user_cache_dir(), f"smollm2-135m-hf-{dtype}")
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch
        print(f"[vllm_bench] exporting the embedded SmolLM2-135M to {path}", file=sys.stderr)
        save_hf(load_model(None, device="cpu", dtype=torch.float32), path, dtype=getattr(torch, dtype))
    return path


def prompts_for(tok, n: int) -> list:
    from d3kernels.calibrate import builtin_prompts
    texts = builtin_prompts()[:n]
    while len(texts) < n:
        texts += texts
    out = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
           for t in texts[:n]]
    return [list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids) for ids in out]


def drive(engine, SamplingParams, prompts, tokens, arrivals):
    """Add prompts[k] at host time arrivals[k] (s after start), step until all finish; (makespan s,
    generated tokens)."""
    order, k, t0, done, gen = sorted(range(len(prompts)), key=lambda i: arrivals[i]), 0, time.perf_counter(), 0, 0
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    while done < len(prompts):
        now = time.perf_counter() - t0
        while k < len(order) and arrivals[order[k]] <= now:
            ids = prompts[order[k]]
            engine.add_request(f"r{time.perf_counter_ns()}", {"prompt_token_ids": list(ids)}, sp)
            k += 1
        if not engine.has_unfinished_requests():
            time.sleep(min(0.001, max(0.0, arrivals[order[k]] - now)))
            continue
        for o in engine.step():
            if o.finished:
                done += 1
                gen += len(o.outputs[0].token_ids)
    return time.perf_counter() - t0, gen


def read_trace(path: str, start: int, L: int) -> dict:
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            f.seek(start)
            recs = [json.loads(x) for x in f if x.strip()]
    decode = [r for r in recs if r["step_min"] > 0]
    # the generated tokens are the decode tokens (step >= 1, N_i layers each) plus one T_0 per request,
    # from its prompt pass at L layers: the caller adds those
    dec_tokens = sum(r["decode_tokens"] for r in recs)
    dec_layers = sum(r["token_layers"] - L * (r["tokens"] - r["decode_tokens"]) for r in recs)
    return {"forwards": len(recs), "decode_forwards": len(decode), "decode_tokens": dec_tokens,
            "decode_token_layers": dec_layers,
            "mean_calls_per_decode_forward": (sum(r["layer_calls"] for r in decode) / len(decode)) if decode else None}


def run_setting(args, model, name, overrides, prompts, arrivals, L) -> dict:
    from vllm import LLM, SamplingParams
    trace = os.environ["D3K_VLLM_TRACE"]
    kw = dict(dtype=args.dtype, enforce_eager=not args.compiled, max_model_len=args.max_model_len, seed=0,
              skip_tokenizer_init=True, max_num_seqs=max(8, args.requests))
    if overrides:
        kw["hf_overrides"] = overrides
    t = time.perf_counter()
    llm = LLM(model, **kw)
    startup = time.perf_counter() - t
    eng = llm.llm_engine
    drive(eng, SamplingParams, prompts[:1], args.tokens, [0.0])          # warm-up
    res = {"setting": name, "overrides": overrides, "startup_s": round(startup, 1)}
    single = []
    start = os.path.getsize(trace) if os.path.exists(trace) else 0
    for r in range(args.repeats):
        s, n = drive(eng, SamplingParams, prompts[r % len(prompts):][:1], args.tokens, [0.0])
        single.append(n / s)
    tr = read_trace(trace, start, L)
    res["single_tok_s"] = round(statistics.median(single), 1)
    res["single_runs"] = [round(x, 1) for x in single]
    res["single_layers_per_token"] = (L * args.repeats + tr["decode_token_layers"]) / \
        (args.repeats + tr["decode_tokens"]) if tr["forwards"] else float(L)
    start = os.path.getsize(trace) if os.path.exists(trace) else 0
    s, n = drive(eng, SamplingParams, prompts, args.tokens, arrivals)
    tr = read_trace(trace, start, L)
    res["poisson_tok_s"] = round(n / s, 1)
    res["poisson_makespan_s"] = round(s, 2)
    res["poisson_layers_per_token"] = (L * len(prompts) + tr["decode_token_layers"]) / \
        (len(prompts) + tr["decode_tokens"]) if tr["forwards"] else float(L)
    res["poisson_calls_per_decode_forward"] = tr["mean_calls_per_decode_forward"] or float(L)
    del llm, eng
    import gc
    gc.collect()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF directory (default: the embedded SmolLM2, exported once)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--alphas", default="0.998,0.99,0.95", help="D3 alphas to run after stock vLLM")
    ap.add_argument("--start", type=float, default=0.5)
    ap.add_argument("--tail", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per request")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s")
    ap.add_argument("--repeats", type=int, default=3, help="single-stream runs per engine start")
    ap.add_argument("--rounds", type=int, default=2,
                    help="passes over all settings (ABC ABC: each setting's engine started once per round); "
                         "the figures are medians over rounds, with the range")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--compiled", action="store_true", help="vLLM's torch.compile (default: enforce_eager)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["D3K_VLLM_TRACE"] = os.path.join(tempfile.mkdtemp(prefix="d3k-vllm-bench-"), "trace.jsonl")
    import random

    from transformers import AutoConfig, AutoTokenizer
    model = args.model or export_embedded(args.dtype)
    L = AutoConfig.from_pretrained(model).num_hidden_layers
    try:
        prompts = prompts_for(AutoTokenizer.from_pretrained(model), args.requests)
    except Exception as e:          # a weights-only directory: random prompts of 32-64 tokens
        print(f"[vllm_bench] no tokenizer in {model} ({type(e).__name__}): random prompts", file=sys.stderr)
        g = random.Random(1)
        vocab = AutoConfig.from_pretrained(model).vocab_size
        prompts = [[g.randrange(vocab) for _ in range(g.randrange(32, 65))] for _ in range(args.requests)]
    rng = random.Random(0)
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    arch = AutoConfig.from_pretrained(model).architectures[0]
    settings = [("stock vLLM", None)] + [
        (f"D3 alpha={a}", {"architectures": [f"D3{arch}"], "d3_alpha": float(a), "d3_start": args.start,
                           "d3_tail": args.tail}) for a in args.alphas.split(",") if a]
    runs = {name: [] for name, _ in settings}
    for rnd in range(args.rounds):
        for name, ov in settings:
            print(f"[vllm_bench] round {rnd + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_setting(args, model, name, ov, prompts, arrivals, L))
    rows = []
    for name, _ in settings:
        rs = runs[name]
        single = [x for r in rs for x in r["single_runs"]]
        poisson = [r["poisson_tok_s"] for r in rs]
        rows.append(dict(rs[0], single_tok_s=round(statistics.median(single), 1), single_runs=single,
                         single_range=[min(single), max(single)], poisson_tok_s=round(statistics.median(poisson), 1),
                         poisson_runs=poisson, rounds=rs))
    base = rows[0]
    import torch
    import vllm
    print(f"\nvLLM {vllm.__version__}, torch {torch.__version__}, {model}, {args.dtype}, "
          f"{'compiled' if args.compiled else 'eager'}, {torch.get_num_threads()} threads; "
          f"{args.tokens} tokens/request; poisson: {args.requests} requests at {args.rate}/s")
    print(f"median over {args.rounds} rounds x {args.repeats} single runs (range in brackets); poisson: median "
          f"over {args.rounds} rounds")
    print("| setting | single tok/s | vs stock | layers/token | poisson tok/s | vs stock | layers/token | "
          "layer calls/decode step | ideal (L / layers) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['single_tok_s']} [{r['single_range'][0]}-{r['single_range'][1]}] | "
              f"{r['single_tok_s'] / base['single_tok_s']:.3f}x | "
              f"{r['single_layers_per_token']:.2f} | {r['poisson_tok_s']} [{min(r['poisson_runs'])}-"
              f"{max(r['poisson_runs'])}] | "
              f"{r['poisson_tok_s'] / base['poisson_tok_s']:.3f}x | {r['poisson_layers_per_token']:.2f} | "
              f"{r['poisson_calls_per_decode_forward']:.2f} | {L / r['single_layers_per_token']:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"L": L, "model": model, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
