"""End-to-end decode benchmarks (batch 1, prompt 128, 256 new tokens on a GPU).

In one run, per model shape (random weights on the GPU):
  * d3kernels at alpha=1 (full depth) and with D3 at several alphas, per backend;
  * plain PyTorch eager and CUDA-graph decode (the same driver with plain torch math);
  * Hugging Face transformers generate, default and static cache;
  * a depth sweep: time per step against the number of kept layers, beside the
    ideal line bytes(n) / read bandwidth.
D3's ideal speedup is full-depth bytes / D3 bytes over the same steps; the
measured speedup is time(alpha=1) / time(alpha) from this run.

Each case also asserts what it timed: the launches each step made (every layer
at full depth, n layers at depth n), the tokens generate() returned, and, in
float32 (smoke mode), the plain PyTorch decode's tokens against the reference
Decoder's (in bfloat16 its own rounding may flip a near tie of a random model).
"""
import pytest
import torch

import bench_common as bc
import torch_baseline
from collections import Counter

from d3kernels import D3Schedule, Decoder, backends
from d3kernels.speed import ideal_speedup, step_bytes

PROMPT = 8 if bc.SMOKE else 128
NEW = 4 if bc.SMOKE else 256
ALPHAS = [1.0, 0.995, 0.99, 0.98] if not bc.QUICK else [1.0, 0.99]
D3_BACKENDS = ["reference"] if bc.SMOKE else ["cuda", "triton"]
_FULL = {}          # (shape, backend) -> ms per step at alpha=1, for the speedup of later cases
_MODELS = {}


def _model(shape):
    if shape not in _MODELS:
        _MODELS.clear()                 # one model on the GPU at a time
        torch.cuda.empty_cache() if bc.GPU else None
        _MODELS[shape] = bc.random_model(shape)
    return _MODELS[shape]


def _prompt(cfg):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab, (1, PROMPT), generator=g)


def _time_decode(dec, prompt):
    return bc.time_decode(dec, prompt, NEW)


def _bytes_per_step(cfg, layers_per_step):
    return bc.bytes_per_step(cfg, layers_per_step, PROMPT)


# pytest varies the top decorator fastest: alphas run in order (alpha=1 first) within one backend and
# shape, and the shape changes last, so each random model is built once.
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("backend", D3_BACKENDS)
@pytest.mark.parametrize("shape", bc.shapes())
def test_d3_decode(benchmark, read_bw, shape, backend, alpha):
    model = _model(shape)
    cfg = model.config
    reason = backends.why_not(backend, bc.DEVICE, bc.DTYPE, cfg.head_dim)
    if reason:
        pytest.skip(f"backend {backend}: {reason}")
    sched = D3Schedule(cfg.num_layers, alpha=alpha)
    dec = Decoder(model, sched, max_seq_len=PROMPT + NEW + 1, backend=backend)
    ms, mem_growth = _time_decode(dec, _prompt(cfg))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    layers = [sched.num_kept(i) for i in range(NEW + 1)]
    if alpha == 1.0:
        _FULL[(shape, backend)] = ms
    full = _FULL.get((shape, backend))
    nbytes = _bytes_per_step(cfg, layers)
    row = bc.record(benchmark, read_bw, int(nbytes), {"median_us": ms * 1e3, "clock": "cuda-events" if bc.GPU else "host"},
                    kind="decode", impl=f"d3kernels-{backend}", shape=shape, alpha=alpha,
                    mean_layers=sum(layers[1:]) / NEW, ms_per_token=ms, tokens_per_s=1e3 / ms,
                    ideal_speedup=ideal_speedup(cfg, layers, PROMPT, torch.empty((), dtype=bc.DTYPE).element_size()),
                    speedup_vs_full=(full / ms) if full else None, graphs=dec.stats()["graphs"],
                    graph_pool_bytes=dec.stats()["graph_pool_bytes"], mem_growth_bytes=mem_growth)
    if row["speedup_vs_full"]:
        row["fraction_of_ideal"] = row["speedup_vs_full"] / row["ideal_speedup"]
        benchmark.extra_info["fraction_of_ideal"] = row["fraction_of_ideal"]
    assert ms > 0 and row["graphs"] <= sched.n_flex + 1


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("shape", bc.shapes())
def test_torch_decode(benchmark, read_bw, shape, graphs):
    """Plain PyTorch decode at full depth, eager and in a CUDA graph (same driver, plain torch math)."""
    if graphs and not bc.GPU:
        pytest.skip("CUDA graphs need a GPU")
    model = _model(shape)
    cfg = model.config
    dec = Decoder(model, D3Schedule(cfg.num_layers, alpha=1.0), max_seq_len=PROMPT + NEW + 1,
                  backend="reference", cuda_graphs=False)
    dec.core.ops = torch_baseline
    dec.core.graphs_enabled = graphs
    ms, _ = _time_decode(dec, _prompt(cfg))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    layers = [cfg.num_layers] * (NEW + 1)
    bc.record(benchmark, read_bw, int(_bytes_per_step(cfg, layers)), {"median_us": ms * 1e3},
              kind="decode", impl="torch-graph" if graphs else "torch-eager", shape=shape, alpha=1.0,
              mean_layers=cfg.num_layers, ms_per_token=ms, tokens_per_s=1e3 / ms)
    # what ran: every layer at every step (eager: every step launches; graphs: one graph, launched twice
    # by its capture, then replayed)
    L, steps = cfg.num_layers, (1 if bc.SMOKE else 2) * NEW
    launched = steps if not graphs else 2
    assert dec.stats()["graphs"] == (1 if graphs else 0)
    assert dec.stats()["op_calls"] == {"attn_block": L * launched, "mlp_block": L * launched, "lm_head": launched}
    if bc.DTYPE == torch.float32:
        dec.prefill(_prompt(cfg))
        ref = Decoder(model, D3Schedule(cfg.num_layers, alpha=1.0), max_seq_len=PROMPT + NEW + 1,
                      backend="reference", cuda_graphs=False)
        ref.prefill(_prompt(cfg))
        assert torch.equal(dec.decode(NEW), ref.decode(NEW))


def _hf_model(cfg):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab, tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=4096)
    old = torch.get_default_dtype()
    torch.set_default_dtype(bc.DTYPE)
    try:
        with torch.device(bc.DEVICE):
            return transformers.LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("shape", bc.shapes())
def test_hf_generate(benchmark, read_bw, shape, cache):
    """transformers generate: (time for NEW tokens - time for 1 token) / (NEW - 1)."""
    cfg = bc.config(shape)
    _MODELS.clear()
    hf = _hf_model(cfg)
    ids = _prompt(cfg).to(bc.DEVICE)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"

    def run(n):
        if bc.GPU:
            torch.cuda.synchronize()
        import time
        t = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if bc.GPU:
            torch.cuda.synchronize()
        assert out.shape == (1, PROMPT + n), f"generate returned {tuple(out.shape)} for {n} new tokens"
        return time.perf_counter() - t
    run(NEW)                                   # warm-up
    ms = (run(NEW) - run(1)) * 1e3 / (NEW - 1)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    layers = [cfg.num_layers] * (NEW + 1)
    bc.record(benchmark, read_bw, int(_bytes_per_step(cfg, layers)), {"median_us": ms * 1e3, "clock": "host+sync"},
              kind="decode", impl=f"hf-{cache}", shape=shape, alpha=1.0, mean_layers=cfg.num_layers,
              ms_per_token=ms, tokens_per_s=1e3 / ms)
    del hf


@pytest.mark.parametrize("backend", D3_BACKENDS)
@pytest.mark.parametrize("shape", bc.shapes())
def test_depth_sweep(benchmark, read_bw, shape, backend):
    """Time of one decode step at fixed depths, beside the ideal bytes(n) / read bandwidth."""
    model = _model(shape)
    cfg = model.config
    reason = backends.why_not(backend, bc.DEVICE, bc.DTYPE, cfg.head_dim)
    if reason:
        pytest.skip(f"backend {backend}: {reason}")
    sched = D3Schedule(cfg.num_layers, alpha=0.5)
    dec = Decoder(model, sched, max_seq_len=PROMPT + 64, backend=backend, cuda_graphs=False)
    dec.prefill(_prompt(cfg))
    dsize = torch.empty((), dtype=bc.DTYPE).element_size()
    rows = []
    L = cfg.num_layers
    for n in sorted({L, sched.n_core, (L + sched.n_core) // 2, L - 1}, reverse=True):
        dec.set_schedule(bc.FixedDepth(sched, n))
        p = dec.core.plan([1])
        dec.core.load(p)
        before = Counter(dec.stats()["op_calls"])
        dec.core.launch(p)                        # what one timed step launches: n layers and the lm_head
        ran = Counter(dec.stats()["op_calls"]) - before
        assert len(p.kept) == n and ran == Counter(attn_block=n, mlp_block=n, lm_head=1), (n, ran)
        t = bc.device_time_us(lambda i, p=p: dec.core.launch(p), calls=1, reps=10)
        nbytes = step_bytes(cfg, n, PROMPT, dsize)
        rows.append({"kept": n, "us": t["median_us"], "ideal_us": nbytes / (read_bw * 1e9) * 1e6,
                     "frac_of_read_bw": nbytes / (t["median_us"] * 1e-6) / 1e9 / read_bw})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update({"kind": "depth_sweep", "impl": f"d3kernels-{backend}", "shape": shape,
                                 "rows": rows, "read_bw_gbps": read_bw, **bc.environment()})
    assert all(r["us"] > 0 for r in rows)
