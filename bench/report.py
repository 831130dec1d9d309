"""Turn a `pytest bench/ --benchmark-json=FILE` result into a markdown table and PNG plots.

    python bench/report.py bench.json --out bench/out

Writes OUT/results.md (one row per case) and, with matplotlib, OUT/tokens_vs_alpha.png
(tokens/s against alpha per shape) and OUT/step_vs_layers.png (time per step
against kept layers, with the ideal bytes / read-bandwidth line).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def load_rows(path: str) -> list:
    data = json.load(open(path))
    return [b["extra_info"] for b in data.get("benchmarks", []) if b.get("extra_info")]


def _f(x, fmt="{:.3g}"):
    return "" if x is None else fmt.format(x)


def markdown(rows: list) -> str:
    env = next((r for r in rows if "gpu" in r), {})
    out = [f"Device: {env.get('gpu')}, torch {env.get('torch')}, commit {env.get('commit')}, {env.get('date')}"
           f"{' (SMOKE MODE: host clock, tiny shapes, not a measurement)' if env.get('smoke') else ''}", ""]
    ops = [r for r in rows if r.get("kind") == "op"]
    if ops:
        out += [f"Read bandwidth (streaming-read kernel): {ops[0]['read_bw_gbps']:.0f} GB/s", "",
                "| op | shape | backend | context | median us | GB/s | of read BW |", "|---|---|---|---|---|---|---|"]
        for r in ops:
            out.append(f"| {r['op']} | {r['shape']} | {r['backend']} | {r['context']} | {r['median_us']:.1f} | "
                       f"{r['gbps']:.0f} | {100 * r['frac_of_read_bw']:.1f}% |")
        out.append("")
    dec = [r for r in rows if r.get("kind") == "decode"]
    if dec:
        out += ["| shape | impl | alpha | layers/token | ms/token | tokens/s | of read BW | speedup vs alpha=1 |"
                " ideal | of ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in dec:
            out.append(f"| {r['shape']} | {r['impl']} | {r['alpha']} | {r['mean_layers']:.2f} | {r['ms_per_token']:.3f} |"
                       f" {r['tokens_per_s']:.1f} | {100 * r['frac_of_read_bw']:.1f}% | {_f(r.get('speedup_vs_full'))} |"
                       f" {_f(r.get('ideal_speedup'))} | {_f(r.get('fraction_of_ideal'))} |")
        out.append("")
    for r in rows:
        if r.get("kind") == "depth_sweep":
            out += [f"Depth sweep, {r['shape']}, {r['impl']}:", "", "| kept layers | us/step | ideal us | of read BW |",
                    "|---|---|---|---|"]
            out += [f"| {x['kept']} | {x['us']:.1f} | {x['ideal_us']:.1f} | {100 * x['frac_of_read_bw']:.1f}% |"
                    for x in r["rows"]] + [""]
    return "\n".join(out)


def plots(rows: list, outdir: str) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    made = []
    dec = defaultdict(list)
    for r in rows:
        if r.get("kind") == "decode" and r["impl"].startswith("d3kernels"):
            dec[(r["shape"], r["impl"])].append((r["alpha"], r["tokens_per_s"]))
    if dec:
        fig, ax = plt.subplots(figsize=(6, 4))
        for (shape, impl), pts in sorted(dec.items()):
            pts.sort()
            ax.plot([a for a, _ in pts], [t for _, t in pts], "o-", label=f"{shape} {impl}")
        ax.set_xlabel("alpha")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
        ax.set_title("Decode throughput against alpha")
        p = os.path.join(outdir, "tokens_vs_alpha.png")
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        made.append(p)
    sweeps = [r for r in rows if r.get("kind") == "depth_sweep"]
    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in sweeps:
            xs = [x["kept"] for x in r["rows"]]
            line, = ax.plot(xs, [x["us"] for x in r["rows"]], "o-", label=f"{r['shape']} {r['impl']}")
            ax.plot(xs, [x["ideal_us"] for x in r["rows"]], "--", color=line.get_color(), alpha=0.6)
        ax.set_xlabel("kept layers")
        ax.set_ylabel("us per decode step (dashed: bytes / read BW)")
        ax.legend(fontsize=7)
        p = os.path.join(outdir, "step_vs_layers.png")
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        made.append(p)
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = load_rows(args.json)
    if not rows:
        raise SystemExit(f"{args.json}: no benchmark rows with extra_info")
    md = markdown(rows)
    open(os.path.join(args.out, "results.md"), "w").write(md + "\n")
    print(md)
    for p in plots(rows, args.out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
