#!/usr/bin/env python3
"""Quick benchmark for a first GPU run: the figures that plan the next step, in about two minutes.

    python bench/quick_bench.py --json OUT/bench.json --md OUT/report.md --summary OUT/bench_summary.txt \\
        [--budget-s 130] [--only read_bw,ops,decode,launches,ttft]

bf16, batch 1, context 512 (a 512-token prompt), random weights on the GPU:
  * read_bw   the suite's own streaming-read kernel (bench_read.py) over 1 GiB, at the start and the end;
  * ops       attn_block, mlp_block and lm_head of one layer at the Llama-3.2-1B shape, for cuda, triton
              and plain PyTorch: us per call (CUDA-graph replays, weights rotated past the L2), GB/s and
              the fraction of the read bandwidth;
  * decode    256 tokens after the prompt at full depth (alpha=1) at the Llama-3.2-1B and Llama-3-8B
              shapes for cuda, triton and the plain PyTorch CUDA-graph step run alongside (ms per token,
              the bytes/read-bandwidth floor, the ratio to plain PyTorch); then D3 at alpha=0.998 over
              the same 256 tokens: measured speedup against the ideal bytes ratio; at Llama-3.2-1B also
              full depth on a paged KV cache (pages of 16, impl "<backend>-paged16") against contiguous;
  * launches  kernels per decode step counted by the torch profiler at two depths (eager steps), so
              launches per kept layer and the fixed part per step, for cuda, triton and plain PyTorch;
  * ttft      time to first token of the 512-token prompt (prefill is the fp32 reference today).

Cases run in that order of importance; once --budget-s seconds have passed, the remaining cases are
recorded as skipped, never started. The JSON (and the markdown) are rewritten after every case, so a
run stopped from outside still leaves what it measured. A failing case records its error and the run
goes on. Exit status 0 when every case that ran succeeded.

Without a GPU (or with D3K_BENCH_SMOKE=1) every case runs once on the tiny shape with host clocks
(the reference backend and interpreted Triton), which proves the code runs; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():                   # interpreted Triton on CPU tensors, set before any kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402
import torch_baseline  # noqa: E402
from d3kernels import D3Schedule, Decoder, backends  # noqa: E402
from d3kernels.speed import ideal_speedup  # noqa: E402

SMOKE = bc.SMOKE
OP_SHAPE = "tiny" if SMOKE else "llama-3.2-1b"
DECODE_SHAPES = ["tiny"] if SMOKE else ["llama-3.2-1b", "llama-3-8b"]
CONTEXT = 16 if SMOKE else 512
NEW = 6 if SMOKE else 256
ALPHA = 0.8 if SMOKE else 0.998                    # smoke: a tiny model must see several depths in 6 steps
BACKENDS = ["reference", "triton"] if SMOKE else ["cuda", "triton"]
TORCH_IMPL = "torch-eager" if SMOKE else "torch-graph"
SECTIONS = ("read_bw", "ops", "decode", "launches", "ttft")


class Run:
    """Results, errors and the time budget of one quick-bench run; saved after every case."""

    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.res = {"env": {**bc.environment(), "dtype": str(bc.DTYPE), "batch": 1, "context": CONTEXT,
                            "new_tokens": NEW, "alpha": ALPHA},
                    "read_bw_gbps": None, "read_bw_end_gbps": None, "ops": [], "decode": [], "d3": [],
                    "launches": [], "ttft": [], "errors": [], "skipped": [], "case_s": {}}
        self.only = set(args.only.split(",")) if args.only else set(SECTIONS)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def case(self, section: str, name: str, fn):
        """Run one case unless its section is off or the budget is spent; record errors, save."""
        if section not in self.only and section != "model":
            return None
        if self.args.budget_s and self.elapsed() > self.args.budget_s:
            self.res["skipped"].append(f"{section}/{name}: budget of {self.args.budget_s:.0f} s spent")
            self.save()
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # record and go on: one broken case must not hide the others
            msg = f"{type(e).__name__}: {e}".strip()
            self.res["errors"].append({"case": f"{section}/{name}", "error": msg[:2000],
                                       "trace": traceback.format_exc()[-3000:]})
            print(f"!! {section}/{name} failed: {msg[:300]}", flush=True)
            out = None
        finally:
            self.res["case_s"][f"{section}/{name}"] = round(time.perf_counter() - t, 2)
            self.save()
        return out

    def save(self):
        for path, text in ((self.args.json, lambda: json.dumps(self.res, indent=1, default=str)),
                           (self.args.md, lambda: markdown(self.res)), (self.args.summary, lambda: summary(self.res))):
            if path:
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(text() + "\n")
                os.replace(tmp, path)


def _sync():
    if bc.GPU:
        torch.cuda.synchronize()


def _impl(name: str, head_dim: int):
    """(ops module, backend name for Decoder) of an implementation, or raise why it cannot run."""
    if name.startswith("torch"):
        return torch_baseline, "reference"
    reason = backends.why_not(name, bc.DEVICE, bc.DTYPE, head_dim)
    if reason:
        raise RuntimeError(f"backend {name} unavailable: {reason}")
    return backends.get(name), name


def _prompt(cfg, n=CONTEXT):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab, (1, n), generator=g)


def _decoder(model, impl: str, alpha: float, max_seq_len: int, graphs=None, page_size=None) -> Decoder:
    cfg = model.config
    ops, backend = _impl(impl, cfg.head_dim)
    sched = D3Schedule(cfg.num_layers, alpha=alpha)
    if impl.startswith("torch"):                     # plain PyTorch math in the same driver
        dec = Decoder(model, sched, max_seq_len=max_seq_len, backend="reference", cuda_graphs=False)
        dec.core.ops = ops
        dec.core.graphs_enabled = impl == "torch-graph" and bc.GPU
        return dec
    return Decoder(model, sched, max_seq_len=max_seq_len, backend=backend, cuda_graphs=graphs, page_size=page_size)


# ----------------------------------------------------------------------------------------------- cases
def case_ops(run: Run, impl_name: str, op: str) -> dict:
    cfg = bc.config(OP_SHAPE)
    impl, _ = _impl(impl_name, cfg.head_dim)
    fn, calls, nbytes = bc.op_case(impl, op, cfg, CONTEXT)
    t = bc.device_time_us(fn, calls=calls)
    gbps = bc.x_bytes_gbps(nbytes, t["median_us"])
    row = {"op": op, "impl": impl_name, "shape": OP_SHAPE, "context": CONTEXT, **t, "bytes": nbytes, "gbps": gbps,
           "frac_of_read_bw": gbps / run.res["read_bw_gbps"], "l2_copies": calls}
    run.res["ops"].append(row)
    return row


def case_decode(run: Run, model, impl: str, alpha: float, page_size=None) -> dict:
    cfg = model.config
    dec = _decoder(model, impl, alpha, CONTEXT + NEW + 1, page_size=page_size)
    ms, growth = bc.time_decode(dec, _prompt(cfg), NEW)
    layers = [dec.schedule.num_kept(i) for i in range(NEW + 1)]
    nbytes = bc.bytes_per_step(cfg, layers, CONTEXT)
    bw = run.res["read_bw_gbps"]
    row = {"shape": cfg.name, "impl": impl if page_size is None else f"{impl}-paged{page_size}", "alpha": alpha, "new": NEW, "prompt": CONTEXT, "ms_per_token": ms,
           "tokens_per_s": 1e3 / ms, "mean_layers": sum(layers[1:]) / NEW, "bytes_per_step": nbytes,
           "floor_ms": nbytes / (bw * 1e9) * 1e3, "frac_of_read_bw": nbytes / (ms * 1e-3) / 1e9 / bw,
           "graphs": dec.stats()["graphs"], "graph_pool_bytes": dec.stats()["graph_pool_bytes"],
           "mem_growth_bytes": growth, "distinct_depths": len(set(layers[1:]))}
    full = [r for r in run.res["decode"] if r["shape"] == cfg.name and r["impl"] == impl and r["alpha"] == 1.0]
    if alpha != 1.0:
        row["ideal_speedup"] = ideal_speedup(cfg, layers, CONTEXT, bc.dtype_bytes())
        if full:
            row["speedup_vs_full"] = full[0]["ms_per_token"] / ms
            row["fraction_of_ideal"] = row["speedup_vs_full"] / row["ideal_speedup"]
        run.res["d3"].append(row)
    else:
        base = [r for r in run.res["decode"] if r["shape"] == cfg.name and r["impl"] == TORCH_IMPL]
        if base and impl != TORCH_IMPL:
            row["vs_torch_graph"] = base[0]["ms_per_token"] / ms
        if page_size is not None and full:
            row["vs_contiguous"] = full[0]["ms_per_token"] / ms
        run.res["decode"].append(row)
    del dec
    return row


def _kernel_count(prof) -> int:
    """Device kernels in a torch.profiler trace (copies and memsets left out)."""
    n = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            n += 1
    return n


def case_launches(run: Run, model, impl: str, reps: int = 1 if SMOKE else 3) -> dict:
    from torch.profiler import ProfilerActivity, profile
    cfg = model.config
    dec = _decoder(model, impl, 0.5, CONTEXT + 4 * reps + 8, graphs=False)
    dec.core.graphs_enabled = False
    dec.prefill(_prompt(cfg))
    sched, core = dec.schedule, dec.core
    L, n_small = cfg.num_layers, dec.schedule.n_core
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bc.GPU else [])
    per = {}
    for n in (L, n_small):
        dec.set_schedule(bc.FixedDepth(sched, n))
        p = core.plan([1])
        core.load(p)
        core.launch(p)                               # warm-up: compile, scratch
        _sync()
        core.op_calls.clear()
        with profile(activities=acts) as prof:
            for _ in range(reps):
                core.launch(p)
            _sync()
        per[n] = (_kernel_count(prof) / reps, sum(core.op_calls.values()) / reps)
    k_layer = (per[L][0] - per[n_small][0]) / (L - n_small)
    c_layer = (per[L][1] - per[n_small][1]) / (L - n_small)
    row = {"shape": cfg.name, "impl": impl, "depths": [L, n_small],
           "kernels_per_step": [per[L][0], per[n_small][0]], "op_calls_per_step": [per[L][1], per[n_small][1]],
           "kernels_per_kept_layer": k_layer if bc.GPU else None, "kernels_fixed": (per[L][0] - k_layer * L)
           if bc.GPU else None, "op_calls_per_kept_layer": c_layer, "op_calls_fixed": per[L][1] - c_layer * L,
           "counted_by": "torch.profiler (eager steps, sampling not included)" if bc.GPU else "op calls only (no GPU)"}
    run.res["launches"].append(row)
    return row


def case_ttft(run: Run, model, impl: str, reps: int = 3) -> dict:
    cfg = model.config
    dec = _decoder(model, impl, 1.0, CONTEXT + 1)
    prompt = _prompt(cfg)
    ts = []
    for r in range(reps + 1):                        # the first is a warm-up
        _sync()
        t = time.perf_counter()
        dec.prefill(prompt)
        int(dec.core.sample(range(1))[0])            # the token on the host: a real end-to-end sync
        if r:
            ts.append((time.perf_counter() - t) * 1e3)
    row = {"shape": cfg.name, "impl": impl, "prompt": CONTEXT, "ttft_ms": statistics.median(ts), "min_ms": min(ts),
           "prefill": "reference (fp32)", "clock": "host + sync"}
    run.res["ttft"].append(row)
    return row


# --------------------------------------------------------------------------------------------- output
def _p(x, fmt="{:.3g}", none="-"):
    return none if x is None else fmt.format(x)


def _lines(res: dict) -> list:
    env = res["env"]
    bw, bw2 = res["read_bw_gbps"], res["read_bw_end_gbps"]
    out = [f"quick bench: {env['gpu']}, torch {env['torch']}, commit {env['commit']}, {env['date']}, {env['dtype']}, "
           f"batch 1, context {CONTEXT}" + ("  [SMOKE MODE: host clock, tiny shapes, not a measurement]"
                                            if env.get("smoke") else ""),
           f"read BW (stream-read kernel, 1 GiB): {_p(bw, '{:.0f}')} GB/s at the start, {_p(bw2, '{:.0f}')} at the end"]
    if res["ops"]:
        out += [f"ops at {OP_SHAPE} (us per call, CUDA-graph replays, L2 defeated):",
                f"  {'op':<11} {'impl':<10} {'us':>9} {'GB/s':>7} {'of BW':>7}"]
        out += [f"  {r['op']:<11} {r['impl']:<10} {r['median_us']:>9.2f} {r['gbps']:>7.0f} "
                f"{100 * r['frac_of_read_bw']:>6.1f}%"
                for r in res["ops"]]
    if res["decode"]:
        out += [f"decode at full depth, {NEW} tokens after a {CONTEXT}-token prompt (ms per token, CUDA events):",
                f"  {'shape':<13} {'impl':<15} {'ms/tok':>8} {'floor':>7} {'of BW':>7} {'vs torch-graph':>15} "
                f"{'paged vs contiguous':>20}"]
        out += [f"  {r['shape']:<13} {r['impl']:<15} {r['ms_per_token']:>8.3f} {r['floor_ms']:>7.3f} "
                f"{100 * r['frac_of_read_bw']:>6.1f}% {_p(r.get('vs_torch_graph'), '{:.2f}x'):>15} "
                f"{_p(r.get('vs_contiguous'), '{:.3f}x'):>20}"
                for r in res["decode"]]
    if res["d3"]:
        out += [f"D3 alpha={ALPHA}, {NEW} tokens (speedup = ms at alpha=1 / ms at alpha; ideal = bytes ratio):",
                f"  {'shape':<13} {'impl':<10} {'layers':>6} {'ms/tok':>8} {'speedup':>8} {'ideal':>6} {'of ideal':>9} "
                f"{'graphs':>6}"]
        out += [f"  {r['shape']:<13} {r['impl']:<10} {r['mean_layers']:>6.2f} {r['ms_per_token']:>8.3f} "
                f"{_p(r.get('speedup_vs_full'), '{:.3f}'):>8} {r['ideal_speedup']:>6.3f} "
                f"{_p(r.get('fraction_of_ideal'), '{:.3f}'):>9} {r['graphs']:>6}" for r in res["d3"]]
    if res["launches"]:
        out += ["launches per decode step (torch profiler, eager; sampling not included):",
                f"  {'shape':<13} {'impl':<12} {'kernels/kept layer':>18} {'fixed':>6} {'op calls/layer':>15}"]
        out += [f"  {r['shape']:<13} {r['impl']:<12} {_p(r['kernels_per_kept_layer'], '{:.2f}'):>18} "
                f"{_p(r['kernels_fixed'], '{:.1f}'):>6} {r['op_calls_per_kept_layer']:>15.2f}" for r in res["launches"]]
    if res["ttft"]:
        out += [f"time to first token, {CONTEXT}-token prompt (fp32 reference prefill + lm_head + sample):"]
        out += [f"  {r['shape']:<13} {r['impl']:<10} {r['ttft_ms']:>9.1f} ms (min {r['min_ms']:.1f})"
                for r in res["ttft"]]
    n_ok = sum(1 for k in res["case_s"] if k not in {e["case"] for e in res["errors"]})
    out.append(f"cases: {n_ok} ok, {len(res['errors'])} failed, {len(res['skipped'])} skipped")
    out.append(f"errors: {len(res['errors'])}" + "".join(f"\n  {e['case']}: {e['error'][:240]}" for e in res["errors"]))
    if res["skipped"]:
        out.append("skipped: " + "; ".join(res["skipped"]))
    out.append("case seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["case_s"].items()))
    return out


def summary(res: dict) -> str:
    return "\n".join(_lines(res))


def markdown(res: dict) -> str:
    env = res["env"]
    out = [f"# Quick bench: {env['gpu']}", "", f"torch {env['torch']}, commit {env['commit']}, {env['date']}, "
           f"{env['dtype']}, batch 1, {CONTEXT}-token prompt" + (" (SMOKE MODE: not a measurement)" if env.get("smoke")
                                                                 else ""), "",
           f"Read bandwidth (stream-read kernel): {_p(res['read_bw_gbps'], '{:.0f}')} GB/s "
           f"(end of run: {_p(res['read_bw_end_gbps'], '{:.0f}')} GB/s)", ""]
    if res["ops"]:
        out += ["| op | shape | impl | us | GB/s | of read BW |", "|---|---|---|---|---|---|"]
        out += [f"| {r['op']} | {r['shape']} | {r['impl']} | {r['median_us']:.2f} | {r['gbps']:.0f} | "
                f"{100 * r['frac_of_read_bw']:.1f}% |" for r in res["ops"]] + [""]
    if res["decode"] or res["d3"]:
        out += ["| shape | impl | alpha | layers/token | ms/token | floor ms | of read BW | vs torch-graph | speedup | "
                "ideal | of ideal | graphs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['shape']} | {r['impl']} | {r['alpha']} | {r['mean_layers']:.2f} | {r['ms_per_token']:.3f} | "
                f"{r['floor_ms']:.3f} | {100 * r['frac_of_read_bw']:.1f}% | {_p(r.get('vs_torch_graph'))} | "
                f"{_p(r.get('speedup_vs_full'))} | {_p(r.get('ideal_speedup'))} | {_p(r.get('fraction_of_ideal'))} | "
                f"{r['graphs']} |" for r in res["decode"] + res["d3"]] + [""]
    if res["launches"]:
        out += ["| shape | impl | kernels per kept layer | kernels fixed per step | op calls per kept layer |",
                "|---|---|---|---|---|"]
        out += [f"| {r['shape']} | {r['impl']} | {_p(r['kernels_per_kept_layer'])} | {_p(r['kernels_fixed'])} | "
                f"{r['op_calls_per_kept_layer']:.2f} |" for r in res["launches"]] + [""]
    if res["ttft"]:
        out += ["| shape | impl | prompt | TTFT ms |", "|---|---|---|---|"]
        out += [f"| {r['shape']} | {r['impl']} | {r['prompt']} | {r['ttft_ms']:.1f} |" for r in res["ttft"]] + [""]
    if res["errors"]:
        out += ["Errors:", ""] + [f"- {e['case']}: {e['error'][:500]}" for e in res["errors"]] + [""]
    if res["skipped"]:
        out += ["Skipped:", ""] + [f"- {s}" for s in res["skipped"]] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/out/quick_bench.json")
    ap.add_argument("--md", default=None, help="markdown tables")
    ap.add_argument("--summary", default=None, help="the compact text summary (also printed at the end)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="start no case after this many seconds (0: no limit)")
    ap.add_argument("--only", default="", help=f"comma-separated sections out of {','.join(SECTIONS)}")
    ap.add_argument("--backends", default="", help=f"comma-separated d3kernels backends (default {','.join(BACKENDS)})")
    args = ap.parse_args(argv)
    backs = args.backends.split(",") if args.backends else BACKENDS
    for p in (args.json, args.md, args.summary):
        if p:
            os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    run = Run(args)
    impls = backs + ["torch"]
    # read bandwidth first: every fraction is against it (a failed probe leaves a nominal 1 GB/s)
    run.res["read_bw_gbps"] = run.case("read_bw", "start", bc.measure_read_bandwidth) or 1.0
    for impl in impls:
        for op in ("attn_block", "mlp_block", "lm_head"):
            run.case("ops", f"{op}-{impl}", lambda impl=impl, op=op: case_ops(run, impl, op))
    for shape in DECODE_SHAPES:
        model = None
        if {"decode", "launches", "ttft"} & run.only:
            if bc.GPU:
                torch.cuda.empty_cache()
            model = run.case("model", shape, lambda shape=shape: bc.random_model(shape))
        if model is None:
            continue
        run.case("decode", f"{shape}-{TORCH_IMPL}", lambda: case_decode(run, model, TORCH_IMPL, 1.0))
        for impl in backs:
            run.case("decode", f"{shape}-{impl}", lambda impl=impl: case_decode(run, model, impl, 1.0))
        for impl in backs:
            run.case("decode", f"{shape}-{impl}-alpha{ALPHA}", lambda impl=impl: case_decode(run, model, impl, ALPHA))
        if shape == DECODE_SHAPES[0]:
            for impl in backs:
                run.case("decode", f"{shape}-{impl}-paged16",
                         lambda impl=impl: case_decode(run, model, impl, 1.0, page_size=16))
            for impl in backs + [TORCH_IMPL]:
                run.case("launches", f"{shape}-{impl}", lambda impl=impl: case_launches(run, model, impl))
        ttft_impl = next((b for b in backs if not backends.why_not(b, bc.DEVICE, bc.DTYPE, model.config.head_dim)),
                         "reference")
        run.case("ttft", f"{shape}-{ttft_impl}", lambda: case_ttft(run, model, ttft_impl))
        del model
    if bc.GPU:
        torch.cuda.empty_cache()
    run.res["read_bw_end_gbps"] = run.case("read_bw", "end", bc.measure_read_bandwidth)
    run.save()
    print("\n".join(_lines(run.res)), flush=True)
    return 1 if run.res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
