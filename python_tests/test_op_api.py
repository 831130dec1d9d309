"""The op layer as a stable low-level API (README, "Low-level API"), on the CPU.

- Every torch.ops.d3k.* op: its schema marks exactly the arguments it mutates,
  torch.library.opcheck passes (schema, fake kernel, aliasing, aot_dispatch),
  its CPU kernel is the reference, and a bad argument fails with the check's
  message both eagerly and while torch.compile traces (the fake kernel checks).
- One decode step made of these ops (embedding lookup, kept layers of
  attn_block + mlp_block, write_kv for a skipped layer, lm_head, sample)
  compiles with torch.compile(fullgraph=True): one graph, no graph break, no
  recompile when only positions, tokens and noise change, and the compiled
  step equals the eager one bit for bit. Bitwise, not a tolerance: the d3k ops
  are opaque to the compiler, so compiled and eager steps run the same
  kernels on the same inputs, and what the compiler does generate (the
  embedding gather, pos += active) is exact.
- The README's low-level loop runs and equals the Decoder's tokens.
- Imports run one way: each module imports only modules of lower layers
  (LAYERS below), parsed with ast, lazy imports included.
"""
import ast
import os
import re

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import tiny_model

import d3kernels
from d3kernels import _ops
from d3kernels import reference as ref
from d3kernels.model import rope_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "d3kernels")
EPS = 1e-5
OP_NAMES = ["attn_block", "mlp_block", "write_kv", "attn_block_paged", "write_kv_paged", "lm_head", "sample_greedy",
            "sample"]
MUTATES = {"attn_block": ["out", "k_cache", "v_cache", "kv_valid"], "mlp_block": ["out"],
           "write_kv": ["k_cache", "v_cache", "kv_valid"],
           "attn_block_paged": ["out", "k_pages", "v_pages", "kv_valid_pages"],
           "write_kv_paged": ["k_pages", "v_pages", "kv_valid_pages"], "lm_head": ["logits"],
           "sample_greedy": ["tokens"], "sample": ["tokens"]}


def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t


def _rope(S, D, theta=10000.0, device="cpu"):
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    f = torch.outer(torch.arange(S, dtype=torch.float64), inv)
    return f.cos().float().to(device), f.sin().float().to(device)


def cpu_args(name, variant=0):
    """Small CPU arguments for op `name`. variant 1: the other branches (no bias, inactive rows, "copy",
    a padded logits row stride, greedy sampling through the noise op)."""
    g = torch.Generator().manual_seed(variant)
    B, d, H, Hkv, D, S, F, V, L = 2, 16, 4, 2, 8, 6, 12, 11, 3
    R = (H + 2 * Hkv) * D
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cos, sin = _rope(S, D)
    if name == "attn_block":
        kv_valid = torch.zeros(B, S, dtype=torch.uint8)
        kv_valid[:, :3] = 1
        return (torch.empty(B, d), r(B, d), 1 + 0.1 * r(d), r(R, d) * 0.3, None if variant else r(R) * 0.1,
                r(d, H * D) * 0.3, r(B, Hkv, S, D), r(B, Hkv, S, D), kv_valid, torch.tensor([3, 4], dtype=torch.int32),
                cos, sin, torch.tensor([1, 0 if variant else 1], dtype=torch.uint8), EPS)
    if name == "mlp_block":
        return (torch.empty(B, d), r(B, d), 1 + 0.1 * r(d), r(2 * F, d) * 0.3, r(d, F) * 0.3,
                torch.tensor([1, 0], dtype=torch.uint8), EPS)
    if name == "write_kv":
        return (r(L, B, Hkv, S, D), r(L, B, Hkv, S, D), torch.ones(L, B, S, dtype=torch.uint8), r(B, d),
                1 + 0.1 * r(L, d), r(L, R, d) * 0.3, None if variant else r(L, R) * 0.1,
                torch.tensor([2, 5], dtype=torch.int32), cos, sin,
                torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.uint8), "copy" if variant else "project", EPS)
    if name in ("attn_block_paged", "write_kv_paged"):
        # pages of 4 slots; row 0's positions live in pages 3, 0, row 1's in pages 1, 4 (page 2 unused);
        # variant 1: row 1 writes nothing (slot -1)
        P, ps = 5, 4
        bt = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
        slots = torch.tensor([3 * ps + 3, -1 if variant else 4 * ps + 0], dtype=torch.int64)
        pos = torch.tensor([3, 4], dtype=torch.int32)
        if name == "attn_block_paged":
            valid = (torch.rand(P, ps, generator=g) < 0.7).to(torch.uint8)
            return (torch.empty(B, d), r(B, d), 1 + 0.1 * r(d), r(R, d) * 0.3, None if variant else r(R) * 0.1,
                    r(d, H * D) * 0.3, r(P, ps, Hkv, D), r(P, ps, Hkv, D), valid, bt, pos, slots, cos, sin,
                    torch.tensor([1, 0 if variant else 1], dtype=torch.uint8), EPS)
        return (r(L, P, ps, Hkv, D), r(L, P, ps, Hkv, D), torch.ones(L, P, ps, dtype=torch.uint8), r(B, d),
                1 + 0.1 * r(L, d), r(L, R, d) * 0.3, None if variant else r(L, R) * 0.1, bt, pos, slots, cos, sin,
                torch.tensor([[0, 0], [1, 0], [1, 1]], dtype=torch.uint8), "copy" if variant else "project", EPS)
    if name == "lm_head":
        return (torch.empty(B, V), r(B, d), 1 + 0.1 * r(d), r(V, d) * 0.3, EPS)
    logits = r(B, V + 5)[:, :V] if variant else r(B, V)
    if name == "sample_greedy":
        return (torch.empty(B, dtype=torch.int64), logits)
    if name == "sample":
        noise = torch.empty(B, V).exponential_(generator=g)
        return (torch.empty(B, dtype=torch.int64), logits, noise, 0.0 if variant else 0.8, 4, 0.9)
    raise KeyError(name)


# =========================================================================== registration
def test_every_op_is_registered():
    assert sorted(_ops.SCHEMAS) == sorted(OP_NAMES)
    for name in OP_NAMES:
        assert hasattr(torch.ops.d3k, name), name


def test_import_d3kernels_registers_the_ops():
    """The ops exist after a plain `import d3kernels` (backends imports _ops), in a fresh interpreter."""
    import subprocess
    import sys
    code = "import d3kernels, torch; print(all(hasattr(torch.ops.d3k, n) for n in %r))" % (OP_NAMES,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("name", OP_NAMES)
def test_schema_marks_mutated_arguments(name):
    schema = getattr(torch.ops.d3k, name).default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == MUTATES[name]
    assert len(schema.returns) == 0


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck_cpu(name, variant):
    """Schema, fake kernel, aliasing and aot_dispatch of the torch.library op (CPU kernel = reference)."""
    torch.library.opcheck(getattr(torch.ops.d3k, name).default, cpu_args(name, variant))


def _reference(name, args):
    if name == "sample_greedy":
        ref.sample(*args)
    elif name == "sample":
        ref.sample_from_noise(*args)
    else:
        getattr(ref, name)(*args)


@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("name", OP_NAMES)
def test_cpu_kernel_is_the_reference(name, variant):
    args = cpu_args(name, variant)
    a = [_clone(t) for t in args]
    b = [_clone(t) for t in args]
    getattr(torch.ops.d3k, name)(*a)
    _reference(name, b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_write_kv_by_keyword():
    """The schema names write_kv's mode "fill_mode" (an argument named "mode" breaks aot_dispatch)."""
    args = cpu_args("write_kv")
    a = [_clone(t) for t in args]
    b = [_clone(t) for t in args]
    torch.ops.d3k.write_kv(*a[:11], fill_mode=a[11], eps=a[12])
    ref.write_kv(*b)
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_sample_op_equals_the_generator_sample():
    """d3k.sample with noise drawn from a generator picks what ops.sample picks from the same generator."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 20, 0.9), (0.0, 0, 1.0)):
        for seed in range(5):
            a, b = torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64)
            noise = torch.empty(4, 300).exponential_(generator=torch.Generator().manual_seed(seed))
            torch.ops.d3k.sample(a, logits, noise, temperature, top_k, top_p)
            d3kernels.ops.sample(b, logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
            assert torch.equal(a, b), (temperature, top_k, top_p, seed)


@pytest.mark.gpu
def test_sample_ops_on_cuda():
    """On CUDA tensors sample_greedy runs the argmax kernel and sample the reference's torch code; both
    pick what the reference picks, and both pass opcheck there."""
    if not _ops.CUDA_OPS_AVAILABLE or _ops.arch_problem("cuda") is not None:
        pytest.skip(_ops.C_ERROR or _ops.arch_problem("cuda") or "d3kernels._C has no CUDA kernels")
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(3, 1001, device="cuda", generator=g)
    noise = torch.empty(3, 1001, device="cuda").exponential_(generator=g)
    a, b = torch.empty(3, dtype=torch.int64, device="cuda"), torch.empty(3, dtype=torch.int64, device="cuda")
    torch.ops.d3k.sample_greedy(a, logits)
    assert torch.equal(a, logits.argmax(-1))
    torch.ops.d3k.sample(a, logits, noise, 0.8, 50, 0.9)
    ref.sample_from_noise(b, logits, noise, 0.8, 50, 0.9)
    assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.d3k.sample_greedy.default, (a, logits))
    torch.library.opcheck(torch.ops.d3k.sample.default, (a, logits, noise, 0.8, 50, 0.9))


BAD = [
    ("mlp_block", 5, torch.ones(2, dtype=torch.int32), "expected row_active of dtype torch.uint8"),
    ("attn_block", 9, torch.tensor([3, 4]), "expected pos of dtype torch.int32"),
    ("write_kv", 11, "fill", "mode must be one of"),
    ("attn_block_paged", 11, torch.tensor([15, 16], dtype=torch.int32), "expected slot_mapping of dtype torch.int64"),
    ("write_kv_paged", 7, torch.zeros(2, 2, dtype=torch.int64), "expected block_table of dtype torch.int32"),
    ("lm_head", 0, torch.empty(2, 11, dtype=torch.float16), "expected logits of dtype torch.float32"),
    ("sample_greedy", 0, torch.empty(3, dtype=torch.int64), r"expected tokens of shape \(2,\)"),
    ("sample", 3, -1.0, "temperature must be >= 0"),
]


@pytest.mark.parametrize("name,index,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_fail_eagerly_and_while_tracing(name, index, value, message):
    args = list(cpu_args(name))
    args[index] = value
    op = getattr(torch.ops.d3k, name)
    with pytest.raises((ValueError, TypeError), match=message):
        op(*args)

    def f(*a):
        op(*a)
    _reset_dynamo()                                       # static shapes in the message, as eagerly
    with pytest.raises(Exception, match=message):        # raised by the fake kernel, before any kernel runs
        torch.compile(f, fullgraph=True, backend="aot_eager")(*args)


# =========================================================================== one decode step, compiled
L, B, S = 3, 2, 24


def _step_state(model, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    k = torch.zeros(L, B, cfg.kv_heads, S, cfg.head_dim)
    valid = torch.zeros(L, B, S, dtype=torch.uint8)
    for b, n in enumerate((5, 9)):                 # a prompt's worth of cache per row
        k[:, b, :, :n] = torch.randn(L, cfg.kv_heads, n, cfg.head_dim, generator=g)
        valid[:, b, :n] = 1
    flags = torch.zeros(L, B, dtype=torch.uint8)
    flags[1] = 1                                   # layer 1 is skipped (project fill)
    return dict(h=torch.zeros(B, cfg.hidden), tmp=torch.zeros(B, cfg.hidden), k=k, v=k.flip(-1).clone(),
                valid=valid, pos=torch.tensor([5, 9], dtype=torch.int32), active=torch.ones(B, dtype=torch.uint8),
                flags=flags, logits=torch.zeros(B, cfg.vocab), greedy=torch.zeros(B, dtype=torch.int64),
                tokens=torch.tensor([7, 11]), noise=torch.ones(B, cfg.vocab))


KEYS = ("h", "tmp", "k", "v", "valid", "pos", "active", "flags", "logits", "greedy", "tokens", "noise")


def _make_step(model):
    cfg, w = model.config, model.weights
    cos, sin = rope_tables(cfg, S)
    d3k = torch.ops.d3k

    def step(kept, h, tmp, k, v, valid, pos, active, flags, logits, greedy, tokens, noise):
        torch.index_select(w.embed, 0, tokens, out=h)
        for l in range(L):
            if l not in kept:
                if l == 0 or l - 1 in kept:        # the first layer of a skipped run writes the run's K/V
                    d3k.write_kv(k, v, valid, h, w.attn_norm, w.wqkv, w.bqkv, pos, cos, sin, flags, "project",
                                 cfg.eps)
                continue
            lw = w.layers[l]
            d3k.attn_block(tmp, h, lw.attn_norm, lw.wqkv, lw.bqkv, lw.wo, k[l], v[l], valid[l], pos, cos, sin,
                           active, cfg.eps)
            d3k.mlp_block(h, tmp, lw.mlp_norm, lw.w_gate_up, lw.w_down, active, cfg.eps)
        d3k.lm_head(logits, h, w.final_norm, w.lm_head, cfg.eps)
        d3k.sample_greedy(greedy, logits)
        d3k.sample(tokens, logits, noise, 0.8, 20, 0.9)
        pos.add_(active)
    return step


def _run(step, kept, s):
    step(kept, *[s[k] for k in KEYS])


def _reset_dynamo():
    torch._dynamo.reset()
    counters.clear()


def test_decode_step_compiles_once_and_matches_eager():
    """Inductor (the default backend) compiles the whole step into one graph; later steps, with new
    positions, tokens and noise, reuse it (a recompile raises); compiled and eager states agree bit for bit;
    and the generated code allocates nothing of a KV cache's size (the ops mutate the cache in place)."""
    from torch._inductor.utils import run_and_get_code
    model = tiny_model(L=L)
    step = _make_step(model)
    kept = (0, 2)
    eager, comp = _step_state(model), _step_state(model)
    _reset_dynamo()
    compiled = torch.compile(step, fullgraph=True)
    g_eager, g_comp = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i in range(5):
        eager["noise"].exponential_(generator=g_eager)
        comp["noise"].exponential_(generator=g_comp)
        if i == 3:                                  # positions are data: jump them
            for s in (eager, comp):
                s["pos"].copy_(torch.tensor([12, 2], dtype=torch.int32))
        _run(step, kept, eager)
        if i == 0:
            _, codes = run_and_get_code(lambda: _run(compiled, kept, comp))
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                _run(compiled, kept, comp)
        for name in KEYS:
            assert torch.equal(comp[name], eager[name]), f"step {i}: {name}"
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert int(eager["pos"][0]) == 14 and not torch.equal(eager["greedy"], torch.zeros(B, dtype=torch.int64))
    cache_slice = B * model.config.kv_heads * S * model.config.head_dim
    code = "\n".join(codes)
    allocs = re.findall(r"empty_strided\w*\(\(([\d, ]*)\)", code)
    assert allocs, "no allocation found in the generated code: the check below would pass vacuously"
    for shape in allocs:
        numel = 1
        for n in filter(None, (x.strip() for x in shape.split(","))):
            numel *= int(n)
        assert numel < cache_slice, f"the compiled step allocates a cache-sized buffer ({shape})"


def test_one_graph_per_kept_set():
    """A D3 loop: the step recompiles when the kept set changes, once per distinct set, never for a set it
    has seen, and each compiled step equals the eager one."""
    model = tiny_model(L=L)
    step = _make_step(model)
    _reset_dynamo()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager, comp = _step_state(model), _step_state(model)
    plan = [(0, 1, 2), (0, 2), (0, 2), (0,), (0, 2), (0, 1, 2)]
    for i, kept in enumerate(plan):
        for s in (eager, comp):
            s["noise"].exponential_(generator=torch.Generator().manual_seed(i))
            s["flags"].zero_()
            s["flags"][[l for l in range(L) if l not in kept]] = 1
        _run(step, kept, eager)
        with torch._dynamo.config.patch(error_on_recompile=kept in plan[:i]):
            _run(compiled, kept, comp)
        for name in KEYS:
            assert torch.equal(comp[name], eager[name]), f"step {i} {kept}: {name}"
    assert counters["stats"]["unique_graphs"] == len(set(plan))
    assert not counters["graph_break"]


# =========================================================================== the README loop
def _readme_block() -> str:
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("\n## Low-level API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)\n```", section, re.S)[0]


def test_readme_low_level_loop_equals_the_decoder(monkeypatch):
    """The README's loop, run as written on a tiny model (load_model and encode_prompt stand-ins; the
    aot_eager backend keeps the compiles short), gives the Decoder's tokens exactly."""
    model = tiny_model(L=4, V=101)
    prompts = {"Hi!": [5, 17, 3], "Name three rivers.": [9, 2, 44, 61, 8, 30]}
    monkeypatch.setattr(d3kernels, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(d3kernels, "encode_prompt", lambda m, p, raw=False: list(prompts[p]))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compile_(f, backend="aot_eager", **kw))
    _reset_dynamo()
    ns = {}
    # not "README.md": tracing reads the source by file name and line, and the block starts at line 1
    exec(compile(_readme_block(), "<README.md, Low-level API>", "exec"), ns)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    dec = d3kernels.Decoder(model, ns["sched"], max_batch=len(prompts), max_seq_len=ns["S"])
    n = ns["out"].shape[1]
    g = dec.generate(list(prompts.values()), n, ignore_eos=True)
    assert torch.equal(ns["out"], g.tokens)


# =========================================================================== import direction
# Lowest first. A module may import only modules of strictly lower layers (so modules of one layer are
# independent, and there is no cycle). Packages (reference/, triton/) count as one module; "__init__" is the
# package itself (`from . import __version__`). Every d3kernels module must be listed here.
LAYERS = [
    ("_C", "_C_emu", "_C_cpu", "quant"),   # torch and the stdlib: the extensions; packed weights
    ("gguf",),         # GGUF files: header, architectures, checks, the mapped tensors (on quant)
    ("checks", "guarded", "model", "schedule", "stops", "tolerance", "workspace"),
    ("cache", "declare"),   # the KV cache layouts (their slot rule is the reference's too); the op declarations
    ("reference",),    # the specification
    ("speed", "triton", "engine", "prefill"),
    ("_ops",),         # torch.library registration and the CUDA backends; the only importer of _C / _C_emu
    ("verify", "cpu"),  # the selftest records; the native cpu backend (on _ops' import of _C_cpu)
    ("backends",),     # the backend table
    ("ops",),          # the public op API
    ("step",),         # the step core: device state, plan and run
    ("speculative",),  # lossless D3 on the step core
    ("decoder",),      # the single-request driver
    ("generate", "hf", "serving", "vllm_plugin"),   # vllm_plugin: the vLLM integration (schedule, engine)
    ("calibrate", "selftest", "service"),   # service: the engine loop over a Server (serve's core)
    ("eval", "openai_api"),   # openai_api: the HTTP server of `d3kernels serve`
    ("__init__",),
    ("cli",),          # the command line, on top
    ("__main__",),
]
EXTENSIONS = {"_C", "_C_emu", "_C_cpu"}


def _modules() -> dict:
    """{unit: [file paths]} for every Python module of the package."""
    units = {}
    for entry in sorted(os.listdir(PKG)):
        path = os.path.join(PKG, entry)
        if entry.endswith(".py"):
            units.setdefault(entry[:-3], []).append(path)
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
            units[entry] = [os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs if f.endswith(".py")]
    return units


def _unit_of(dotted: str):
    """The unit of an absolute module name inside d3kernels, or None for other packages."""
    parts = dotted.split(".")
    if parts[0] != "d3kernels":
        return None
    if len(parts) == 1:
        return "__init__"
    name = parts[1]
    if name in EXTENSIONS or os.path.exists(os.path.join(PKG, name + ".py")) or os.path.isdir(
            os.path.join(PKG, name)):
        return name
    return "__init__"                               # an attribute of the package, e.g. __version__


def _imports(path: str) -> set:
    """Units imported by one file, anywhere in it (lazy imports and importlib.import_module included)."""
    package = os.path.relpath(path, ROOT)[:-3].split(os.sep)[:-1]    # e.g. ["d3kernels", "triton"]
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_unit_of(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.module else []
            if node.level:
                base = package[: len(package) - node.level + 1] + base
            dotted = ".".join(base)
            if node.module is None or dotted == "d3kernels":
                found.update(_unit_of(f"{dotted}.{a.name}") for a in node.names)
            else:
                found.add(_unit_of(dotted))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(_unit_of(node.args[0].value))
    found.discard(None)
    return found


def test_layers_list_every_module():
    listed = [m for layer in LAYERS for m in layer]
    assert len(listed) == len(set(listed))
    missing = set(_modules()) - set(listed)
    assert not missing, f"place the new modules {sorted(missing)} in LAYERS (test_op_api.py)"


def test_imports_point_down():
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    wrong = []
    for unit, paths in _modules().items():
        for path in paths:
            for dep in _imports(path) - {unit}:
                if dep in EXTENSIONS and unit != "_ops":
                    wrong.append(f"{os.path.relpath(path, ROOT)} imports {dep} (only _ops may)")
                elif rank[dep] >= rank[unit]:
                    wrong.append(f"{os.path.relpath(path, ROOT)} (layer {rank[unit]}) imports {dep} "
                                 f"(layer {rank[dep]})")
    assert not wrong, "imports must point to lower layers:\n" + "\n".join(wrong)


def test_import_parser_sees_lazy_and_relative_imports():
    """The checker itself: lazy, relative, parent-relative and importlib imports are all found."""
    assert _imports(os.path.join(PKG, "backends.py")) >= {"_ops", "reference", "triton"}
    assert "reference" in _imports(os.path.join(PKG, "triton", "__init__.py"))
    assert {"__init__", "_ops", "backends", "eval"} <= _imports(os.path.join(PKG, "cli.py"))
    assert _imports(os.path.join(PKG, "checks.py")) == {"quant"}
    assert "_C" in _imports(os.path.join(PKG, "_ops.py"))


def test_ops_still_exports_the_checks():
    """Code that imported the checks from d3kernels.ops keeps working."""
    from d3kernels import checks, ops
    for name in ("FILL_MODES", "check_attn_block", "check_mlp_block", "check_write_kv", "check_lm_head",
                 "check_sampling", "check_sample", "expect"):
        assert getattr(ops, name) is getattr(checks, name)
