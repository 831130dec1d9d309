"""Shared benchmark machinery (docs/design.md section 7): shapes, random models,
device timing, the streaming-read bandwidth probe, and result records."""
from __future__ import annotations

import datetime
import math
import os
import statistics
import subprocess
import time

import torch

from d3kernels.model import ModelConfig, Weights, Model

GPU = torch.cuda.is_available()
SMOKE = (not GPU) or os.environ.get("D3K_BENCH_SMOKE") == "1"
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
QUICK = os.environ.get("D3K_BENCH_QUICK") == "1"      # a subset for iterating
L2_BYTES = 50 * 2 ** 20

# name: (layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied, qkv_bias)
SHAPES = {
    "smollm2-135m": (30, 576, 9, 3, 64, 1536, 49152, True, False),
    "llama-3.2-1b": (16, 2048, 32, 8, 64, 8192, 128256, True, False),
    "llama-2-7b": (32, 4096, 32, 32, 128, 11008, 32000, False, False),
    "llama-3-8b": (32, 4096, 32, 8, 128, 14336, 128256, False, False),
}
TINY = {"tiny": (6, 64, 4, 2, 16, 96, 101, False, False)}


def shapes(full=tuple(SHAPES), quick=("llama-3.2-1b",)):
    """Shape names for this run: tiny in smoke mode, a subset in quick mode."""
    if SMOKE:
        return list(TINY)
    return list(quick if QUICK else full)


def config(name: str) -> ModelConfig:
    L, d, H, Hkv, D, F, V, tied, bias = {**SHAPES, **TINY}[name]
    return ModelConfig(arch="llama", num_layers=L, hidden=d, heads=H, kv_heads=Hkv, head_dim=D, intermediate=F,
                       vocab=V, eps=1e-5, rope_theta=500000.0, max_position=8192, tie_embeddings=tied,
                       qkv_bias=bias, eos_token_ids=(), name=name)


def random_weights(cfg: ModelConfig, device=DEVICE, dtype=DTYPE, seed=0) -> Weights:
    """Random weights allocated directly on the device (std chosen so activations stay O(1))."""
    g = torch.Generator(device=device).manual_seed(seed)
    L, d, F = cfg.num_layers, cfg.hidden, cfg.intermediate

    def r(*shape, std):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)
    embed = r(cfg.vocab, d, std=1.0)
    return Weights(
        embed=embed, final_norm=torch.ones(d, device=device, dtype=dtype),
        lm_head=embed if cfg.tie_embeddings else r(cfg.vocab, d, std=d ** -0.5),
        attn_norm=torch.ones(L, d, device=device, dtype=dtype), wqkv=r(L, cfg.qkv_rows, d, std=d ** -0.5),
        bqkv=r(L, cfg.qkv_rows, std=0.1) if cfg.qkv_bias else None,
        wo=r(L, d, cfg.heads * cfg.head_dim, std=(cfg.heads * cfg.head_dim) ** -0.5 / L),
        mlp_norm=torch.ones(L, d, device=device, dtype=dtype), w_gate_up=r(L, 2 * F, d, std=d ** -0.5),
        w_down=r(L, d, F, std=F ** -0.5 / L))


def random_model(name: str, device=DEVICE, dtype=DTYPE) -> Model:
    cfg = config(name)
    return Model(cfg, random_weights(cfg, device, dtype), None, source=f"random {name}")


def device_time_us(fn, calls: int = 1, reps: int = 20, warmup: int = 3, graph: bool = True) -> dict:
    """Median time of one call of fn, in microseconds.

    On a GPU: fn is captured `calls` times into one CUDA graph (so fn may rotate
    through weight copies by call index), replayed `reps` times between CUDA
    events; median / calls. Without a GPU (smoke mode) a host clock is used,
    which says only that the case runs.
    """
    if not GPU:
        for i in range(warmup if not SMOKE else 1):
            fn(i)
        ts = []
        for _ in range(1 if SMOKE else reps):
            t = time.perf_counter()
            for i in range(calls):
                fn(i)
            ts.append((time.perf_counter() - t) / calls * 1e6)
        return {"median_us": statistics.median(ts), "p20_us": min(ts), "p80_us": max(ts), "clock": "host"}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(max(warmup, 1)):
            for c in range(calls):
                fn(c)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in range(calls):
                fn(c)
        run = g.replay
    else:
        def run():
            for c in range(calls):
                fn(c)
    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    ts.sort()
    return {"median_us": statistics.median(ts), "p20_us": ts[int(0.2 * (len(ts) - 1))],
            "p80_us": ts[int(0.8 * (len(ts) - 1))], "clock": "cuda-graph" if graph else "cuda-events"}


def dtype_bytes() -> int:
    return torch.empty((), dtype=DTYPE).element_size()


def layer_set(cfg: ModelConfig, S: int, n: int, B: int = 1) -> list:
    """n independent copies of one layer's weights plus a KV cache [B, H_kv, S, D] each (all valid)."""
    out = []
    for c in range(n):
        w = random_weights(cfg.__class__(**{**cfg.__dict__, "num_layers": 1, "vocab": 8}), seed=c)
        k = torch.randn(B, cfg.kv_heads, S, cfg.head_dim, device=DEVICE).to(DTYPE)
        v = torch.randn_like(k)
        valid = torch.ones(B, S, device=DEVICE, dtype=torch.uint8)
        out.append((w.layers[0], k, v, valid))
    return out


def op_case(impl, op: str, cfg: ModelConfig, context: int, B: int = 1):
    """One op of one layer ("attn_block", "mlp_block" or "lm_head") at batch B, attending `context`
    cached positions. Returns (fn, calls, nbytes): fn(i) runs the op on copy i % calls of the weights
    (and caches), enough copies to defeat the L2; nbytes = the bytes one call must read.
    fn.result(ops, i, dtype=None) runs the op of `ops` (a backend module) on copy i once more, on copies of
    its inputs (cast to dtype when given; the RoPE tables stay float32), and returns its output, so a
    benchmark can check what it timed against the reference."""
    from d3kernels.model import rope_tables
    d, S, dsize = cfg.hidden, context + 1, dtype_bytes()
    h = torch.randn(B, d, device=DEVICE).to(DTYPE)
    out = torch.empty_like(h)
    active = torch.ones(B, device=DEVICE, dtype=torch.uint8)
    pos = torch.full((B,), context, device=DEVICE, dtype=torch.int32)
    if op == "lm_head":
        w = random_weights(cfg.__class__(**{**cfg.__dict__, "num_layers": 1}))
        lm = [w.lm_head] + [torch.randn_like(w.lm_head) for _ in range(copies_to_defeat_l2(w.lm_head.nbytes) - 1)]
        logits = torch.empty(B, cfg.vocab, device=DEVICE, dtype=torch.float32)

        def call(ops, i, o, cast):
            ops.lm_head(o, cast(h), cast(w.final_norm), cast(lm[i % len(lm)]), cfg.eps)
        return op_fn(impl, call, logits), len(lm), w.lm_head.nbytes + d * dsize
    sets = layer_set(cfg, S, copies_to_defeat_l2(cfg.layer_bytes(dsize)), B)
    cos, sin = rope_tables(cfg, S, DEVICE)
    if op == "attn_block":
        nbytes = (cfg.qkv_rows + cfg.heads * cfg.head_dim) * d * dsize + 2 * cfg.kv_heads * cfg.head_dim * S * dsize

        def call(ops, i, o, cast):
            lw, k, v, valid = sets[i % len(sets)]
            ops.attn_block(o, cast(h), cast(lw.attn_norm), cast(lw.wqkv), cast(lw.bqkv), cast(lw.wo), cast(k),
                           cast(v), cast(valid), pos, cos, sin, active, cfg.eps)
    elif op == "mlp_block":
        nbytes = 3 * cfg.intermediate * d * dsize

        def call(ops, i, o, cast):
            lw = sets[i % len(sets)][0]
            ops.mlp_block(o, cast(h), cast(lw.mlp_norm), cast(lw.w_gate_up), cast(lw.w_down), active, cfg.eps)
    else:
        raise ValueError(f"unknown op {op!r}")
    return op_fn(impl, call, out), len(sets), nbytes


def op_fn(impl, call, out: torch.Tensor):
    """fn(i) = call(impl, i, out, no cast): the timed call. fn.result(ops, i, dtype): call(ops, i, a fresh
    NaN-filled output, cast) on copies of the inputs (cast to dtype when given, the output too)."""
    def fn(i):
        call(impl, i, out, lambda t: t)

    def result(ops, i, dtype=None):
        def cast(t):
            if t is None or not isinstance(t, torch.Tensor):
                return t
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()
        o = torch.full(out.shape, float("nan"), device=out.device, dtype=out.dtype if dtype is None else dtype)
        call(ops, i, o, cast)
        return o
    fn.result = result
    return fn


def time_decode(dec, prompt, new: int):
    """(ms per decode step over `new` steps, bytes allocated during the timed pass). Device-timed;
    the first pass warms up (captures graphs), the second is timed on a GPU."""
    for _ in range(1 if SMOKE else 2):
        mem0 = torch.cuda.memory_allocated() if GPU else 0
        dec.prefill(prompt)
        if GPU:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        else:
            t = time.perf_counter()
        dec.decode(new)
        if GPU:
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b) / new
        else:
            ms = (time.perf_counter() - t) * 1e3 / new
    # the decode() output [1, new] is the only allocation a pass may make
    growth = (torch.cuda.memory_allocated() - mem0) if GPU else 0
    return ms, growth


def bytes_per_step(cfg: ModelConfig, layers_per_step, prompt: int) -> float:
    """Mean bytes a decode step reads; layers_per_step[0] is the prompt pass and is left out."""
    from d3kernels.speed import step_bytes
    steps = [(i, n) for i, n in enumerate(layers_per_step) if i > 0]
    return sum(step_bytes(cfg, n, prompt + i, dtype_bytes()) for i, n in steps) / len(steps)


def copies_to_defeat_l2(nbytes: int) -> int:
    """How many rotated copies of `nbytes` of weights make the working set exceed 2x the L2."""
    return 1 if SMOKE else max(1, math.ceil(2 * L2_BYTES / max(1, nbytes)) + 1)


def measure_read_bandwidth() -> float:
    """GB/s of the suite's streaming-read kernel over a 1 GiB buffer (GPU), or torch.sum on CPU."""
    if not GPU:
        x = torch.ones(2 ** 22)
        t = time.perf_counter()
        x.sum()
        return x.numel() * 4 / (time.perf_counter() - t) / 1e9
    from bench_read import stream_read
    x = torch.ones(2 ** 29, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(stream_read.grid(x.numel()), device="cuda", dtype=torch.float32)
    t = device_time_us(lambda i: stream_read(x, out), calls=1, reps=20, graph=False)
    del x
    return x_bytes_gbps(2 ** 30, t["median_us"])


def x_bytes_gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def environment() -> dict:
    """GPU name, torch version, commit and date, stored with every record. Where the checkout has no git
    metadata (a copied working tree), D3K_COMMIT names the commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        commit = ""
    return {"gpu": torch.cuda.get_device_name() if GPU else "cpu (smoke mode)", "torch": torch.__version__,
            "commit": commit or os.environ.get("D3K_COMMIT") or "unknown", "date": datetime.date.today().isoformat(),
            "smoke": SMOKE}


def record(benchmark, read_bw: float, nbytes: int, timing: dict, **info) -> dict:
    """Store a case's device timing, bytes, GB/s and fraction of read bandwidth in extra_info."""
    gbps = x_bytes_gbps(nbytes, timing["median_us"])
    row = {**info, **timing, "bytes": nbytes, "gbps": gbps, "read_bw_gbps": read_bw,
           "frac_of_read_bw": gbps / read_bw, **environment()}
    benchmark.extra_info.update(row)
    return row


class FixedDepth:
    """A schedule that keeps the same n layers of `schedule` at every step, to time one depth:
    dec.set_schedule(FixedDepth(sched, n)); p = dec.core.plan([1]); dec.core.load(p); then
    dec.core.launch(p) is one step's device work (positions stay where they are)."""

    def __init__(self, schedule, n: int):
        self.num_layers, self.n = schedule.num_layers, n
        self._kept, self._core = schedule.kept_for_count(n), schedule.core_layers()

    def kept_layers(self, i: int) -> tuple:
        return self._kept

    def core_layers(self) -> tuple:
        return self._core
