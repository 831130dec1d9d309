#!/usr/bin/env python3
"""PDL on/off and CUDA-graph replay consistency of the CUDA backend, bit for bit.

The C++ side reads D3K_PDL once per process, so the comparison needs two processes:

    D3K_PDL=1 python bench/pdl_check.py run --out /tmp/pdl_on.pt
    D3K_PDL=0 python bench/pdl_check.py run --out /tmp/pdl_off.pt
    python bench/pdl_check.py compare /tmp/pdl_on.pt /tmp/pdl_off.pt [--json FILE]

`run` decodes STEPS tokens for two rows of different prompt lengths at the SmolLM2-135M shape
(vocab cut to 8192) with D3 at alpha=0.995, three times: with one CUDA graph per kept set (15 kept
sets; the last one is replayed about 175 times in a row), eagerly, and eagerly once more (so a
run-to-run difference is told apart from a graph or PDL one). It keeps every step's logits, the
tokens, and the final KV cache and depth mask of each. It also chains lm_head -> argmax ROUNDS times
back to back on fresh hidden states, and runs argmax on planted logits (ties, all -inf, NaN, a
strided view), comparing each with torch.argmax in the same process. Each part is caught on its
own, so one failure still leaves the others to compare.

`compare` checks, bit for bit: eager against eager again and graph against eager within each
process, PDL on against off for both, and the argmax results; where two differ it prints the first
differing step (or layer, for the cache). Exit status 0 when everything agrees and the PDL-on run
really used PDL (on a Hopper GPU) while the D3K_PDL=0 run did not.

Without a GPU (smoke) `run` uses the reference backend on the tiny shape with eager steps only,
which checks this script's own logic.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402
from d3kernels import D3Schedule, Decoder  # noqa: E402

GPU = torch.cuda.is_available()
STEPS = 300 if GPU else 6
ROUNDS = 64 if GPU else 3
PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25]]


def _model():
    if GPU:
        cfg = bc.config("smollm2-135m")
        cfg = cfg.__class__(**{**cfg.__dict__, "vocab": 8192})
        return bc.Model(cfg, bc.random_weights(cfg, "cuda", torch.bfloat16, seed=3), None, source="random smollm2")
    cfg = bc.config("tiny")
    return bc.Model(cfg, bc.random_weights(cfg, "cpu", torch.float32, seed=3), None, source="random tiny")


def _decode(model, graphs: bool) -> dict:
    """Prefill PROMPTS, then STEPS greedy steps with no host sync; every step's logits are kept."""
    cfg = model.config
    backend = "cuda" if GPU else "reference"
    dec = Decoder(model, D3Schedule(cfg.num_layers, alpha=0.995 if GPU else 0.9), max_batch=len(PROMPTS),
                  max_seq_len=max(map(len, PROMPTS)) + STEPS + 1, backend=backend, cuda_graphs=graphs)
    B, dev = len(PROMPTS), dec.device
    logits = torch.empty(STEPS, B, cfg.vocab, device=dev, dtype=torch.float32)
    tokens = torch.empty(STEPS, B, device=dev, dtype=torch.int64)
    dec.prefill(PROMPTS)
    core = dec.core
    core.sample(range(B))                                       # T_0 from the prompt pass
    for k in range(STEPS):
        logits[k].copy_(dec.step(core.tokens[:B]))
        tokens[k].copy_(core.sample(range(B)))
    if GPU:
        torch.cuda.synchronize()
    c = dec.cache
    layers = [dec.schedule.num_kept(i) for i in range(1, STEPS + 1)]
    return {"logits": logits.cpu(), "tokens": tokens.cpu(), "k": c.k[:, :B].cpu(), "v": c.v[:, :B].cpu(),
            "kv_valid": c.kv_valid[:, :B].cpu(), "graphs": dec.stats()["graphs"], "depths": len(set(layers)),
            "graphs_enabled": dec.core.graphs_enabled}


def _argmax_checks(model) -> dict:
    """lm_head -> argmax chained ROUNDS times on fresh hidden states, and argmax on planted logits."""
    cfg, w = model.config, model.weights
    dev = w.embed.device
    if GPU:
        from d3kernels._ops import cuda_ops as ops
    else:
        from d3kernels import reference as ops
    g = torch.Generator(device=dev).manual_seed(7)
    B = 17
    hs = torch.randn(ROUNDS, B, cfg.hidden, generator=g, device=dev).to(w.embed.dtype)
    logits = torch.empty(B, cfg.vocab, device=dev, dtype=torch.float32)
    chain = torch.empty(ROUNDS, B, device=dev, dtype=torch.int64)
    ref = torch.empty_like(chain)
    tok = torch.empty(B, device=dev, dtype=torch.int64)
    for r in range(ROUNDS):                          # back to back: PDL lets each launch start early
        ops.lm_head(logits, hs[r], w.final_norm, w.lm_head, cfg.eps)
        ops.sample(tok, logits)
        chain[r].copy_(tok)
        ref[r].copy_(logits.argmax(-1))
    V = 128256 if GPU else 1001
    big = torch.randn(5, V + 9, generator=g, device=dev)
    planted = big[:, :V]                             # strided rows
    planted[0, 7] = planted[0, V - 3] = planted[0].max() + 1     # tie: the first index wins
    planted[1, :] = float("-inf")                    # all -inf: index 0
    planted[2, 5] = float("nan")                     # NaN counts as the maximum
    planted[3, V - 1] = 1e30                         # the last column
    out = torch.empty(5, device=dev, dtype=torch.int64)
    ops.sample(out, planted)
    want = planted.argmax(-1)
    if GPU:
        torch.cuda.synchronize()
    return {"chain": chain.cpu(), "chain_torch": ref.cpu(), "planted": out.cpu(), "planted_torch": want.cpu()}


def cmd_run(args) -> int:
    torch.manual_seed(0)
    facts = {"D3K_PDL": os.environ.get("D3K_PDL"), "gpu": torch.cuda.get_device_name() if GPU else "cpu"}
    if GPU:
        from d3kernels import _ops
        if not _ops.CUDA_OPS_AVAILABLE:
            print(f"d3kernels._C has no CUDA kernels: {_ops.C_ERROR}")
            return 2
        facts.update(_ops.C.device_facts(torch.cuda.current_device()))
    model = _model()
    res, rc = {"facts": facts}, 0
    parts = (("graph", lambda: _decode(model, graphs=True)), ("eager", lambda: _decode(model, graphs=False)),
             ("eager2", lambda: _decode(model, graphs=False)), ("argmax", lambda: _argmax_checks(model)))
    for name, fn in parts:                           # each part on its own: one failure keeps the others
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"run: {name} failed: {res[name]['error']}")
            rc = 1
    torch.save(res, args.out)
    g = res["graph"]
    if "error" not in g:
        print(f"run: {facts} | steps {STEPS}, kept sets {g['depths']}, graphs captured {g['graphs']} "
              f"(enabled {g['graphs_enabled']}) -> {args.out}")
    return rc


def _first_diff(a: torch.Tensor, b: torch.Tensor):
    """None if a and b are bitwise equal, else (first differing index along dim 0, max abs difference)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return (-1, f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    if a.is_floating_point():                        # compare the bits: NaN == NaN, -0.0 != 0.0
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        ne = (a.contiguous().view(bits) != b.contiguous().view(bits))
    else:
        ne = a != b
    if not bool(ne.any()):
        return None
    first = int(ne.reshape(a.shape[0], -1).any(-1).nonzero()[0]) if a.dim() else 0
    diff = (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item() if a.is_floating_point() else "-"
    return (first, diff)


def cmd_compare(args) -> int:
    on, off = torch.load(args.on, weights_only=False), torch.load(args.off, weights_only=False)
    rows, ok = [], True

    def check(name, a, b):
        nonlocal ok
        if a is None or b is None:
            ok = False
            rows.append({"check": name, "equal": False, "first_diff": "missing", "max_abs_diff": None})
            return
        d = _first_diff(a, b)
        ok &= d is None
        rows.append({"check": name, "equal": d is None, "first_diff": None if d is None else d[0],
                     "max_abs_diff": None if d is None else d[1]})

    notes = []
    for tag, r in (("pdl_on", on), ("pdl_off", off)):
        for part in ("graph", "eager", "eager2", "argmax"):
            if "error" in r.get(part, {"error": "missing"}):
                notes.append(f"{tag} {part} failed: {r.get(part, {}).get('error', 'missing')}")

    def get(r, part, key):
        return r.get(part, {}).get(key)

    for tag, r in (("pdl_on", on), ("pdl_off", off)):
        for key in ("logits", "tokens", "k", "v", "kv_valid"):      # determinism first: it explains the rest
            check(f"{tag}: eager vs eager again {key}", get(r, "eager", key), get(r, "eager2", key))
        for key in ("logits", "tokens", "k", "v", "kv_valid"):
            check(f"{tag}: graph vs eager {key}", get(r, "graph", key), get(r, "eager", key))
        check(f"{tag}: lm_head->argmax chain vs torch.argmax", get(r, "argmax", "chain"),
              get(r, "argmax", "chain_torch"))
        check(f"{tag}: argmax planted (ties, -inf, NaN, strided) vs torch.argmax", get(r, "argmax", "planted"),
              get(r, "argmax", "planted_torch"))
    for mode in ("graph", "eager"):
        for key in ("logits", "tokens", "k", "v", "kv_valid"):
            check(f"PDL on vs off: {mode} {key}", get(on, mode, key), get(off, mode, key))
    check("PDL on vs off: lm_head->argmax chain", get(on, "argmax", "chain"), get(off, "argmax", "chain"))
    check("PDL on vs off: argmax planted", get(on, "argmax", "planted"), get(off, "argmax", "planted"))
    pdl_on, pdl_off = on["facts"].get("pdl"), off["facts"].get("pdl")
    if GPU or "cc" in on["facts"]:
        cc = on["facts"].get("cc", 0)
        if cc >= 90 and pdl_on is not True:
            ok = False
            notes.append(f"the PDL-on run did not use PDL (device_facts pdl={pdl_on}, cc {cc})")
        if pdl_off is not False:
            ok = False
            notes.append(f"the D3K_PDL=0 run reports pdl={pdl_off}")
    g = on.get("graph", {})
    if "error" in g:
        g = {"tokens": torch.empty(0), "depths": None, "graphs": None, "graphs_enabled": None}
    if g["graphs_enabled"] and g["graphs"] != g["depths"]:
        ok = False
        notes.append(f"graphs captured {g['graphs']} != distinct kept sets {g['depths']}")
    ok &= not any(" failed: " in n for n in notes)
    res = {"ok": ok, "facts_on": on["facts"], "facts_off": off["facts"], "steps": int(g["tokens"].shape[0]),
           "kept_sets": g["depths"], "graphs": g["graphs"], "graphs_enabled": g["graphs_enabled"], "checks": rows,
           "notes": notes}
    n_eq = sum(r["equal"] for r in rows)
    print(f"PDL/graph check: {n_eq}/{len(rows)} bitwise equal; {res['steps']} steps, {g['depths']} kept sets, "
          f"{g['graphs']} graphs (enabled {g['graphs_enabled']}); pdl on={pdl_on} off={pdl_off}")
    for r in rows:
        if not r["equal"]:
            print(f"  DIFF {r['check']}: first at index {r['first_diff']} of dim 0 (step, or layer for the cache), "
                  f"max |diff| {r['max_abs_diff']}")
    for n in notes:
        print(f"  NOTE {n}")
    print("PDL/graph check: " + ("PASS" if ok else "FAIL"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="decode and dump (PDL as D3K_PDL says)")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="compare two dumps bit for bit")
    c.add_argument("on")
    c.add_argument("off")
    c.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
