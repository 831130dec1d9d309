"""`d3kernels selftest`: a GPU backend proves itself on this device, against the reference
(docs/design.md section 3.3).

A compact version of the op suite: every op (attn_block, mlp_block, write_kv in every mode, lm_head,
sampling; contiguous and paged) in both 16-bit dtypes, at odd shapes and the model's own when a model is
given, outputs poisoned with NaN and caches NaN wherever kv_valid = 0, judged by the tolerance rule of
d3kernels/tolerance.py (float64 oracle); then a short D3 greedy decode against the reference Decoder,
and on a GPU a CUDA graph replay against eager steps. The result is a record in the user cache
(d3kernels/verify.py) that backends.resolve("auto") reads: a passing record for this device and this
build lets auto pick the backend.
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Callable, Optional

import torch

from . import backends, engine, verify
from . import reference as ref
from .checks import FILL_MODES
from .decoder import Decoder
from .model import Model, ModelConfig, random_model, rope_tables
from .schedule import D3Schedule
from .tolerance import compare, poison

AUTO_ENV = "D3K_SELFTEST"          # "0": auto never runs the selftest itself (the backend stays off)
EPS = 1e-5
PAGE = 16
DTYPES = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)      # the cpu backend's activations: float32 first
# B rows, hidden d, heads H / H_kv, head_dim D (the CUDA kernels take 64 and 128), MLP width F, vocab V,
# cache length S (a multiple of PAGE), bias: Qwen2's qkv bias
SHAPES = {
    "small": dict(B=3, d=128, H=2, H_kv=1, D=64, F=192, V=257, S=48, bias=False),
    "odd": dict(B=5, d=192, H=3, H_kv=1, D=64, F=320, V=1001, S=80, bias=True),
}
BUG_REPORT = ("Please report it on the d3kernels issue tracker with the record file {path} attached (it holds "
              "the device, the versions and every case's result); the backend stays off until a rebuild "
              "passes `d3kernels selftest`.")


def model_shape(cfg: ModelConfig, B: int = 4, S: int = 64) -> dict:
    """A SHAPES entry with a model's own sizes."""
    return dict(B=B, d=cfg.hidden, H=cfg.heads, H_kv=cfg.kv_heads, D=cfg.head_dim, F=cfg.intermediate,
                V=cfg.vocab, S=S, bias=cfg.qkv_bias)


class _Cases:
    """Collects case results and prints progress."""

    def __init__(self, log: Optional[Callable]):
        self.cases, self.log = [], log

    def add(self, name: str, problem: Optional[str], err: float = 0.0, bound: float = 0.0) -> None:
        self.cases.append({"case": name, "passed": problem is None, "error": problem,
                           "max_err": err, "bound": bound})
        if self.log is not None and problem is not None:
            self.log(f"  FAIL {name}: {problem}")

    def close(self, name, out, same, oracle, dtype, nan_where_oracle=False) -> None:
        problem, err, bound = compare(out, same, oracle, dtype, nan_where_oracle)
        self.add(name, problem, err, bound)

    def equal(self, name, out, want) -> None:
        self.add(name, None if torch.equal(out.cpu(), want.cpu()) else "differs from the reference")


def _rng(seed: int, dev):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)
    return g, randn


def _run3(fn_backend, fn_ref, args: list, outs: list, poison_out: bool = True, keep32: tuple = ()) -> tuple:
    """Run an op three times on copies of args: the backend, the reference at the same dtype, the reference
    on float64 copies of every floating tensor but those in keep32 (the float32 RoPE tables, which the ops
    take in float32 only). outs: indices of the written arguments; poison_out: fill args[outs[0]] of the
    backend's copy with NaN first (an out-variant's output). Returns (backend outs, same-precision outs,
    float64 outs)."""
    keep = {id(t) for t in keep32}

    def copies(upcast):
        return [(t.double() if upcast and t.is_floating_point() and id(t) not in keep else t.clone())
                if isinstance(t, torch.Tensor) else t for t in args]
    b, s, o = copies(False), copies(False), copies(True)
    if poison_out:
        poison(b[outs[0]])
    fn_backend(*b)
    fn_ref(*s)
    fn_ref(*o)
    return [b[i] for i in outs], [s[i] for i in outs], [o[i] for i in outs]


def _cache(randn, g, B: int, H_kv: int, S: int, D: int, dtype, dev, L: int = 0) -> tuple:
    """Positions pos [B] (distinct, >= 2), kv_valid [(L,) B, S] (1 below pos, one hole per row), k, v
    [(L,) B, H_kv, S, D] NaN wherever kv_valid = 0."""
    pos = torch.randperm(S - 3, generator=g)[:B] + 2
    valid = (torch.arange(S)[None, :] < pos[:, None]).to(torch.uint8)
    for b in range(B):
        valid[b, int(torch.randint(0, int(pos[b]) - 1, (1,), generator=g))] = 0
    lead = (L,) if L else ()
    valid = valid.expand(*lead, B, S).clone()
    k, v = randn(*lead, B, H_kv, S, D, dtype=dtype), randn(*lead, B, H_kv, S, D, dtype=dtype)
    hole = (valid == 0).to(dev)[..., None, :, None].expand_as(k)
    k[hole], v[hole] = float("nan"), float("nan")
    return pos.to(device=dev, dtype=torch.int32), valid.to(dev), k, v


def _paged(g, k, v, valid, dev):
    """The contiguous cache (k, v [(L,) B, H_kv, S, D], valid [(L,) B, S]) as shuffled pages of PAGE:
    (k_pages [(L,) P, PAGE, H_kv, D], v_pages, valid_pages [(L,) P, PAGE], block_table [B, S/PAGE])."""
    lead = k.shape[:-4]
    B, H_kv, S, D = k.shape[-4:]
    M = S // PAGE
    P = B * M + 3
    table = torch.randperm(P, generator=g)[: B * M].reshape(B, M).to(torch.int32)
    kp = torch.full((*lead, P, PAGE, H_kv, D), float("nan"), dtype=k.dtype, device=dev)
    vp, vlp = kp.clone(), torch.zeros(*lead, P, PAGE, dtype=torch.uint8, device=dev)
    for b in range(B):
        for j in range(M):
            sl = slice(j * PAGE, (j + 1) * PAGE)
            p = int(table[b, j])
            kp[..., p, :, :, :] = k[..., b, :, sl, :].transpose(-3, -2)
            vp[..., p, :, :, :] = v[..., b, :, sl, :].transpose(-3, -2)
            vlp[..., p, :] = valid[..., b, sl]
    return kp, vp, vlp, table.to(dev)


def _op_cases(c: _Cases, ops, tag: str, sh: dict, dtype, dev, seed: int) -> None:
    """Every op once at one shape and dtype."""
    g, randn = _rng(seed, dev)
    B, d, H, H_kv, D, F, V, S = (sh[k] for k in ("B", "d", "H", "H_kv", "D", "F", "V", "S"))
    R, L = (H + 2 * H_kv) * D, 3
    norm = lambda *s: (1 + 0.1 * randn(*s)).to(dtype)           # noqa: E731
    cos, sin = rope_tables(ModelConfig("llama", 1, d, H, H_kv, D, F, V, EPS, 10000.0), S, dev)
    h = randn(B, d, dtype=dtype)
    active = torch.ones(B, dtype=torch.uint8, device=dev)
    active[1] = 0
    wqkv, wo = randn(R, d, scale=d ** -0.5, dtype=dtype), randn(d, H * D, scale=(H * D) ** -0.5, dtype=dtype)
    bqkv = randn(R, scale=0.1, dtype=dtype) if sh["bias"] else None
    an = norm(d)

    # attention, contiguous then paged
    pos, valid, k, v = _cache(randn, g, B, H_kv, S, D, dtype, dev)
    out = torch.empty(B, d, dtype=dtype, device=dev)
    args = [out, h, an, wqkv, bqkv, wo, k, v, valid, pos, cos, sin, active, EPS]
    got, same, ora = _run3(ops.attn_block, ref.attn_block, args, [0, 6, 7, 8], keep32=(cos, sin))
    for name, i in (("out", 0), ("k_cache", 1), ("v_cache", 2)):
        c.close(f"{tag} attn_block {name}", got[i], same[i], ora[i], dtype, nan_where_oracle=i > 0)
    c.equal(f"{tag} attn_block kv_valid", got[3], same[3])
    kp, vp, vlp, table = _paged(g, k, v, valid, dev)
    slots = engine.write_slots(table, pos, active, PAGE)
    args = [out, h, an, wqkv, bqkv, wo, kp, vp, vlp, table, pos, slots, cos, sin, active, EPS]
    got, same, ora = _run3(ops.attn_block_paged, ref.attn_block_paged, args, [0, 6, 7, 8], keep32=(cos, sin))
    for name, i in (("out", 0), ("k_pages", 1), ("v_pages", 2)):
        c.close(f"{tag} attn_block_paged {name}", got[i], same[i], ora[i], dtype, nan_where_oracle=i > 0)
    c.equal(f"{tag} attn_block_paged kv_valid", got[3], same[3])

    # MLP
    args = [out, h, norm(d), randn(2 * F, d, scale=d ** -0.5, dtype=dtype), randn(d, F, scale=F ** -0.5, dtype=dtype),
            active, EPS]
    got, same, ora = _run3(ops.mlp_block, ref.mlp_block, args, [0])
    c.close(f"{tag} mlp_block out", got[0], same[0], ora[0], dtype)

    # the KV writer, every mode, contiguous then paged
    pos, valid, k, v = _cache(randn, g, B, H_kv, S, D, dtype, dev, L=L)
    norms, wq = norm(L, d), randn(L, R, d, scale=d ** -0.5, dtype=dtype)
    bq = randn(L, R, scale=0.1, dtype=dtype) if sh["bias"] else None
    flags = (torch.rand(L, B, generator=g) < 0.6).to(torch.uint8).to(dev)
    flags[0, 0], flags[1, 0], flags[:, 1] = 0, 1, 0              # a copy source; a row that writes nothing
    kp, vp, vlp, table = _paged(g, k, v, valid, dev)
    slots = engine.write_slots(table, pos, active, PAGE)           # row 1 (inactive) writes nothing
    for mode in FILL_MODES:
        args = [k, v, valid, h, norms, wq, bq, pos, cos, sin, flags, mode, EPS]
        got, same, ora = _run3(ops.write_kv, ref.write_kv, args, [0, 1, 2], False, (cos, sin))
        for name, i in (("k_cache", 0), ("v_cache", 1)):
            c.close(f"{tag} write_kv {mode} {name}", got[i], same[i], ora[i], dtype, nan_where_oracle=True)
        c.equal(f"{tag} write_kv {mode} kv_valid", got[2], same[2])
        args = [kp, vp, vlp, h, norms, wq, bq, table, pos, slots, cos, sin, flags, mode, EPS]
        got, same, ora = _run3(ops.write_kv_paged, ref.write_kv_paged, args, [0, 1, 2], False, (cos, sin))
        for name, i in (("k_pages", 0), ("v_pages", 1)):
            c.close(f"{tag} write_kv_paged {mode} {name}", got[i], same[i], ora[i], dtype, nan_where_oracle=True)
        c.equal(f"{tag} write_kv_paged {mode} kv_valid", got[2], same[2])

    # lm_head and sampling
    logits = torch.empty(B, V, device=dev)
    args = [logits, h, norm(d), randn(V, d, scale=3 * d ** -0.5, dtype=dtype), EPS]
    got, same, ora = _run3(ops.lm_head, ref.lm_head, args, [0])
    c.close(f"{tag} lm_head logits", got[0], same[0], ora[0], dtype)
    x = randn(B, V)
    tok, want = poison(torch.empty(B, dtype=torch.int64, device=dev)), torch.empty(B, dtype=torch.int64, device=dev)
    ops.sample(tok, x)
    ref.sample(want, x)
    c.equal(f"{tag} sample greedy", tok, want)
    gens = [torch.Generator(device=dev).manual_seed(seed) for _ in range(2)]
    ops.sample(poison(tok), x, 0.7, 20, 0.9, gens[0])
    ref.sample(want, x, 0.7, 20, 0.9, gens[1])
    c.equal(f"{tag} sample t=0.7 top_k=20 top_p=0.9", tok, want)


def _decode_cases(c: _Cases, backend: str, dtype, dev, graphs: bool) -> None:
    """8 D3 greedy steps of a random 4-layer model: the backend's logits against the reference Decoder's,
    teacher-forced on the backend's tokens (oracle: the reference on float32 weights); on a GPU also
    CUDA graph replays against eager steps, bit for bit."""
    sh = SHAPES["small"]
    m = random_model(4, sh["d"], sh["H"], sh["H_kv"], sh["D"], sh["F"], sh["V"], dtype, dev, seed=7)
    m32 = Model(m.config, m.weights.to(torch.float32))
    sched = D3Schedule(4, alpha=0.8, start=0.25, tail=1)
    prompts = [[5, 17, 3, 99, 42], [7, 150, 2]]
    decs = [Decoder(mm, sched, max_batch=2, max_seq_len=32, backend=b, cuda_graphs=False)
            for mm, b in ((m, backend), (m, "reference"), (m32, "reference"))]
    logits = [dec.prefill(prompts) for dec in decs]
    tag = f"{str(dtype).replace('torch.', '')} decode"
    for i in range(1, 9):
        tokens = logits[0].argmax(-1)
        logits = [dec.step(tokens) for dec in decs]
        c.close(f"{tag} step {i} logits", logits[0], logits[1], logits[2], dtype)
    if not graphs:
        return
    outs = []
    for cg in (False, True):
        dec = Decoder(m, sched, max_batch=2, max_seq_len=32, backend=backend, cuda_graphs=cg)
        outs.append(dec.generate(prompts, max_new_tokens=8, ignore_eos=True).tokens)
        captured = dec.stats()["graphs"] if cg else None
    c.equal(f"{tag} CUDA graph replay tokens", outs[1], outs[0])
    c.add(f"{tag} CUDA graphs captured", None if captured else "no CUDA graph was captured")


def _guard(c: _Cases, tag: str, fn, *args) -> None:
    """Run a group of cases; an exception (a launch error, an out-of-bounds fault) is a failed case."""
    try:
        fn(*args)
    except Exception as e:
        c.add(f"{tag}: raised", f"{type(e).__name__}: {str(e)[:500]}")


def run(backend: str, device=None, model: Optional[ModelConfig] = None, dtypes=DTYPES, shapes=None,
        log: Optional[Callable] = print, save: bool = True) -> dict:
    """Run the selftest of `backend` ("cuda", "triton", or "cuda-emu" on the CPU) on `device` (default: the
    current GPU; the CPU for cuda-emu); model: a ModelConfig whose shape is tested too. shapes: names of
    SHAPES (default all). Returns the record (record["passed"]); save=True writes it (verify.save)."""
    if device is None:
        device = "cpu" if backend in ("cuda-emu", "cpu") else "cuda"
    if backend == "cpu" and dtypes is DTYPES:
        dtypes = CPU_DTYPES
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    reason = backends.why_not(backend, dev, dtypes[0], None if model is None else model.head_dim)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run here: {reason}")
    ops = backends.get(backend)
    todo = {n: SHAPES[n] for n in (shapes or SHAPES)}
    if model is not None:
        todo["model"] = model_shape(model)
    t0, c = time.perf_counter(), _Cases(log)
    for dtype in dtypes:
        for j, (name, sh) in enumerate(todo.items()):
            if log is not None:
                log(f"[selftest] {backend}: ops, {name} shape, {str(dtype).replace('torch.', '')} "
                    f"({time.perf_counter() - t0:.0f} s)")
            tag = f"{str(dtype).replace('torch.', '')} {name}"
            _guard(c, tag, _op_cases, c, ops, tag, sh, dtype, dev, 17 * j + 1)
        if log is not None:
            log(f"[selftest] {backend}: decode, {str(dtype).replace('torch.', '')} ({time.perf_counter() - t0:.0f} s)")
        _guard(c, f"{str(dtype).replace('torch.', '')} decode", _decode_cases, c, backend, dtype, dev,
               dev.type == "cuda")
    ok = all(x["passed"] for x in c.cases)
    record = {"backend": backend, "passed": ok, "device": verify.device_key(dev),
              "build_id": verify.build_id(backend, ops if backend != "triton" else None),
              "package": _package_version(), "torch": torch.__version__, "triton": _triton_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.perf_counter() - t0, 1), "cases": c.cases}
    if save:
        record["path"] = verify.save(record, dev, ops if backend != "triton" else None)
    if log is not None:
        failed = [x for x in c.cases if not x["passed"]]
        log(f"[selftest] {backend}: {'PASS' if ok else 'FAIL'}: {len(c.cases) - len(failed)} of {len(c.cases)} "
            f"cases passed in {record['seconds']} s" + (f"; record: {record['path']}" if save else ""))
    return record


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("d3kernels")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def first_use(backend: str, device) -> bool:
    """backends.resolve("auto")'s check of an unverified backend with no record on this device: runs the
    selftest once (one line says so first), saves the record, prints the failing cases if any. True if it
    passed."""
    name = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "the CPU"
    print(f"d3kernels: verifying the {backend} backend on {name} once, against the reference (about a "
          f"minute; set {AUTO_ENV}=0 to skip this and keep the backend off)", file=sys.stderr, flush=True)
    try:
        rec = run(backend, device, log=None)
    except Exception as e:             # a crash is a failure too; keep the backend off
        print(f"d3kernels: the {backend} selftest crashed ({type(e).__name__}: {e}); the backend stays off. "
              + BUG_REPORT.format(path="(none: it crashed)"), file=sys.stderr)
        return False
    if not rec["passed"]:
        failed = [x for x in rec["cases"] if not x["passed"]]
        lines = "\n".join(f"  {x['case']}: {x['error']}" for x in failed[:20])
        print(f"d3kernels: the {backend} backend FAILED its selftest on {name} ({len(failed)} cases), so auto "
              f"keeps it off:\n{lines}\n" + BUG_REPORT.format(path=rec.get("path")), file=sys.stderr)
    return rec["passed"]
