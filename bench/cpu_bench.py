"""A GGUF file on the CPU, side by side in one run: d3kernels (the native cpu backend on the weights as
loaded) at full depth and under D3, against llama.cpp (llama-cpp-python) on the same file, with the same
threads, the same prompt, greedy, the same number of tokens. Without --gguf: the embedded SmolLM2-135M
file, plus the reference backend on the dequantized float32 weights and HF transformers on the same GGUF.

    python bench/cpu_bench.py [--gguf PATH] [--threads 2] [--tokens 64] [--alpha 0.99] [--reps 5]
                              [--prompt-tokens 256] [--json OUT] [--llama-python /venv/bin/python]

Method:
- Paired, alternating runs: each of --reps rounds measures every engine once, back to back, in an order
  that rotates each round, and one streaming read (torch sum over 1 GiB of float32, --threads threads).
  The tables give the median over rounds; the ratios to llama.cpp are medians of each round's own ratio.
- Decode tokens/s = (n - 1) / (time of n greedy tokens - time of 1 token), each from the same chat prompt
  with a fresh cache (the prompt's prefill cancels out). One untimed warm-up per engine first.
- Prompt processing tokens/s = P / time of one P-token prefill into a fresh cache (--prompt-tokens).
- Bytes per token come from the file's tensor sizes: the kept layers' matrices and norms, the lm_head
  (output.weight, else the tied token_embd) and one embedding row; K/V is left out. Their rate over the
  round's read bandwidth is the "fraction of read BW". D3's ideal speedup is full-depth bytes over D3
  bytes, summed over steps 1..n-1 (step 0 comes from the prefill); its real speedup is the median round's
  D3 tokens/s over full-depth tokens/s.
- d3kernels also reports what its loader made of the file: load seconds, resident memory added, the
  storage types of the matrices and the bytes per token as held (a matrix the loader dequantized reads
  4 bytes a value). A file it refuses is reported and the run goes on with llama.cpp.

llama.cpp runs in a child process (its own thread runtime), in this interpreter when `llama_cpp` imports,
else in --llama-python / D3K_LLAMA_PYTHON; without either its rows are skipped with the reason. Install it
with `CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python` (a bench-only dependency).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PROMPT = "What is the capital of France? Answer in one sentence, then name three other European capitals."
PP_TEXT = ("The river leaves the mountains in a narrow gorge, widens across the plain, and reaches the sea "
           "through a delta of a dozen channels that shift with every flood. Farmers along its banks grow "
           "rice, wheat and cotton, and the towns between them trade by barge as they have for centuries. ")

# The llama.cpp side: one process, the model loaded once, commands as JSON lines on stdin, replies as
# '@@'-prefixed JSON lines on stdout (llama.cpp's own log goes to stderr).
_LLAMA_WORKER = r"""
import json, sys, time
import llama_cpp
path, threads, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=True)
load_s = time.perf_counter() - t
def reply(obj):
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()
reply({"version": getattr(llama_cpp, "__version__", "?"), "load_s": load_s,
       "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()})
for line in sys.stdin:
    cmd = json.loads(line)
    llm.reset()
    t = time.perf_counter()
    if cmd["op"] == "decode":
        out = []
        for tok in llm.generate(cmd["ids"], temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) >= cmd["n"]:
                break
        reply({"s": time.perf_counter() - t, "tokens": out})
    else:
        llm.eval(cmd["ids"])
        reply({"s": time.perf_counter() - t})
"""


def read_bandwidth() -> float:
    """GB/s of a streaming read: torch sum over 1 GiB of float32 (median of 5 after one warm-up)."""
    x = torch.ones(2 ** 28)
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return 2 ** 30 / sorted(ts[1:])[2] / 1e9


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def commit() -> str:
    """The commit of the d3kernels package this run imports (it may be another checkout than this script's, via
    PYTHONPATH), flagged when its d3kernels/ or csrc/ differ from it; D3K_COMMIT where there is no git."""
    import d3kernels
    root = os.path.dirname(os.path.dirname(os.path.abspath(d3kernels.__file__)))
    try:
        h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "d3kernels", "csrc"],
                               capture_output=True, text=True, cwd=root).stdout.strip() if h else ""
    except OSError:
        h, dirty = "", ""
    if not h:
        return os.environ.get("D3K_COMMIT", "unknown") + f" (d3kernels from {root})"
    return h + (" + uncommitted changes in d3kernels/ or csrc/" if dirty else "")


def cpu_flags() -> str:
    """The vector extensions the kernel reports (/proc/cpuinfo): avx2, avx512f, avx512_vnni, avx512_bf16."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        return "unknown"
    return " ".join(x for x in ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16") if x in flags)


def cpu_name() -> str:
    """/proc/cpuinfo's model name with its family and model numbers (a VM may show only "AMD EPYC")."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        return platform.processor() or "unknown"
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"


class FileBytes:
    """Per-token bytes of a GGUF file's tensors as stored (gguf-py's reader; nothing is dequantized)."""

    def __init__(self, path: str):
        import gguf
        r = gguf.GGUFReader(path)
        self.sizes = {t.name: int(t.n_bytes) for t in r.tensors}
        self.types = {t.name: t.tensor_type.name for t in r.tensors}
        self.shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
        f = r.fields.get("general.architecture")
        self.arch = bytes(f.parts[f.data[0]]).decode() if f else "?"
        f = r.fields.get(f"{self.arch}.block_count")
        self.num_layers = int(f.parts[f.data[0]][0]) if f else 0
        self.layer = [sum(v for k, v in self.sizes.items() if k.startswith(f"blk.{l}."))
                      for l in range(self.num_layers)]
        head = "output.weight" if "output.weight" in self.sizes else "token_embd.weight"
        vocab = self.shapes["token_embd.weight"][-1]
        self.head = self.sizes[head] + self.sizes.get("output_norm.weight", 0) + self.sizes["token_embd.weight"] // vocab

    def step(self, kept) -> int:
        return sum(self.layer[l] for l in kept) + self.head

    def type_mix(self) -> str:
        from collections import Counter
        c = Counter(self.types[k] for k in self.types if len(self.shapes[k]) == 2)
        return ", ".join(f"{t} x{n}" for t, n in c.most_common())


class Llama:
    """llama.cpp in a child process (see _LLAMA_WORKER)."""

    def __init__(self, python: str, path: str, threads: int, n_ctx: int):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([python, "-c", _LLAMA_WORKER, path, str(threads), str(n_ctx)], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.info = self._reply()
        self.log.seek(0)
        text = self.log.read()
        self.repack = [l.strip() for l in text.splitlines() if "REPACK" in l and "buffer size" in l]
        self.buffers = [l.strip() for l in text.splitlines() if "buffer size" in l]

    def _reply(self) -> dict:
        for line in self.p.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.log.seek(0)
        tail = [l for l in self.log.read().splitlines() if l.strip()][-3:]
        raise RuntimeError("llama.cpp worker ended: " + " | ".join(tail)[:300])

    def decode(self, ids, n):
        self.p.stdin.write(json.dumps({"op": "decode", "ids": ids, "n": n}) + "\n")
        self.p.stdin.flush()
        r = self._reply()
        return r["s"], r["tokens"]

    def prefill(self, ids) -> float:
        self.p.stdin.write(json.dumps({"op": "prefill", "ids": ids}) + "\n")
        self.p.stdin.flush()
        return self._reply()["s"]

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


def llama_python(arg):
    """(interpreter that imports llama_cpp, None) or (None, why not)."""
    try:
        import llama_cpp  # noqa: F401
        return sys.executable, None
    except ImportError:
        pass
    if arg:
        return arg, None
    return None, "llama_cpp is not installed (CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python, or --llama-python)"


def storage_types(m) -> list:
    """The storage types of one loaded matrix: its block types as kept (several for row blocks), or its
    dtype marked as dequantized. Works with the library's quant.storage where it has one, else .qtype."""
    from d3kernels import quant
    if not quant.is_packed(m):
        return [f"{str(m.dtype).replace('torch.', '')} (dequantized)"]
    return list(quant.storage(m)) if hasattr(quant, "storage") else [m.qtype]


def held_bytes(model) -> tuple:
    """(per-layer bytes of the matrices and norms as the loader holds them, lm_head + final norm, storage
    types of the matrices with counts)."""
    from collections import Counter
    w, cfg = model.weights, model.config
    kinds = Counter()
    layer = []
    for l in range(cfg.num_layers):
        n = w.attn_norm[l].nbytes + w.mlp_norm[l].nbytes
        for k in ("wqkv", "wo", "w_gate_up", "w_down"):
            m = getattr(w, k)[l]
            n += m.nbytes
            kinds.update(storage_types(m))
        layer.append(n)
    lm = w.lm_head
    kinds.update(t + " lm_head" for t in storage_types(lm))
    return layer, lm.nbytes + w.final_norm.nbytes, ", ".join(f"{k} x{v}" for k, v in kinds.most_common())


def unpackable(fb: FileBytes):
    """Matrices of the file that today's loader cannot keep as stored (by d3kernels.quant.GGUF_TYPES), with
    the float32 bytes they would take; None when the library does not say."""
    from d3kernels import quant
    kept = getattr(quant, "GGUF_TYPES", None)
    if kept is None:
        return None
    names = {v.upper() for v in kept.values()}
    bad = {k: t for k, t in fb.types.items() if len(fb.shapes[k]) == 2 and t not in names}
    f32 = sum(4 * fb.shapes[k][0] * fb.shapes[k][1] for k in bad)
    return bad, f32


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=None, help="a GGUF file (default: the embedded model, with extra peers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--alpha", default="0.99", help="comma-separated D3 alphas (besides full depth)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt processing length (0: skip)")
    ap.add_argument("--llama-python", default=os.environ.get("D3K_LLAMA_PYTHON"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n, threads, P = args.tokens, args.threads, args.prompt_tokens
    alphas = [float(a) for a in args.alpha.split(",") if a.strip()]
    torch.set_num_threads(threads)

    from d3kernels import D3Schedule, Decoder, load_model
    from d3kernels.generate import template_ids
    from d3kernels.model import embedded_model_path
    embedded = args.gguf is None
    path = embedded_model_path() if embedded else os.path.abspath(args.gguf)
    fb = FileBytes(path)
    L = fb.num_layers
    try:
        from d3kernels import cpu as d3cpu
        d3cpu.set_num_threads(threads)
        isa = d3cpu.isa()
    except Exception as e:  # noqa: BLE001 (reported below: the cpu backend is not built or cannot run)
        isa = f"unavailable ({type(e).__name__}: {e})"
    env = {"date": datetime.date.today().isoformat(), "commit": commit(), "cpu": cpu_name(),
           "cpu_flags": cpu_flags(), "d3kernels_isa": isa,
           "torch": torch.__version__, "threads": threads, "file": path, "file_bytes": os.path.getsize(path),
           "file_types": fb.type_mix(), "loadavg_start": os.getloadavg()}
    print(f"{path}\n  {os.path.getsize(path) / 1e9:.3f} GB, {L} layers, matrices: {fb.type_mix()}")
    print(f"  {env['date']}, commit {env['commit']}, {env['cpu']} ({env['cpu_flags']}; d3kernels isa {isa}), "
          f"torch {torch.__version__}, {threads} threads, "
          f"{n} greedy tokens, {args.reps} paired rounds, prompt processing at {P} tokens; "
          f"load average {env['loadavg_start'][0]:.1f}", flush=True)

    engines = []       # dicts: name, decode(k) -> (s, tokens), prefill(ids) -> s or None, kept(i) -> layers
    notes = {}
    model = None
    bad = unpackable(fb)
    if bad and bad[1] > 0.6 * mem_available():
        notes["d3kernels"] = (f"skipped: the loader would dequantize {len(bad[0])} matrices "
                              f"({', '.join(sorted(set(bad[0].values())))}) to float32, {bad[1] / 1e9:.1f} GB, "
                              f"more than 60% of the {mem_available() / 1e9:.1f} GB available")
    else:
        r0, t = rss_bytes(), time.perf_counter()
        try:
            model = load_model(path, device="cpu")
            load_s, rss = time.perf_counter() - t, rss_bytes() - r0
        except Exception as e:  # noqa: BLE001 (a refused file is a result)
            notes["d3kernels"] = f"load refused: {type(e).__name__}: {str(e)[:300]}"
    held = None
    if model is not None:
        layer_held, head_held, kinds = held_bytes(model)
        held = (layer_held, head_held)
        env["d3kernels_load"] = {"seconds": load_s, "rss_added": rss, "storage": kinds}
        print(f"d3kernels load: {load_s:.1f} s, +{rss / 1e9:.2f} GB resident; storage: {kinds}")
        if bad and bad[0]:
            print(f"  NOTE: {len(bad[0])} matrices of this file ({', '.join(sorted(set(bad[0].values())))}) are "
                  f"not kept as stored: dequantized to float32 on load")
        ids = template_ids(model.tokenizer, [{"role": "user", "content": PROMPT}])
        tok = model.tokenizer
    else:
        print(f"d3kernels: {notes['d3kernels']}")
        import transformers                          # the tokenizer alone, for the shared prompt
        tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        ids = template_ids(tok, [{"role": "user", "content": PROMPT}])
    pp_ids = []
    while len(pp_ids) < P:
        pp_ids += tok(PP_TEXT, add_special_tokens=False)["input_ids"]
    pp_ids = pp_ids[:P]
    max_seq = max(len(ids) + n + 1, P + 1)

    if model is not None:
        for alpha in [1.0] + alphas:
            sched = D3Schedule(L, alpha=alpha)
            dec = Decoder(model, sched, max_seq_len=max_seq, backend="cpu")

            def d_decode(k, dec=dec):
                t = time.perf_counter()
                g = dec.generate([ids], k, ignore_eos=True)
                return time.perf_counter() - t, g.tokens[0].tolist()

            def d_prefill(p, dec=dec):
                t = time.perf_counter()
                dec.prefill([p])
                return time.perf_counter() - t

            engines.append({"name": "d3kernels cpu, full depth" if alpha == 1.0 else f"d3kernels cpu, alpha {alpha}",
                            "alpha": alpha, "decode": d_decode, "prefill": d_prefill if alpha == 1.0 else None,
                            "kept": sched.kept_layers})

    lp, why = llama_python(args.llama_python)
    llama = None
    if lp:
        try:
            llama = Llama(lp, path, threads, max_seq + 8)
            env["llama_cpp"] = {"version": llama.info["version"], "load_s": llama.info["load_s"],
                                "system_info": llama.info["system_info"], "buffers": llama.buffers}
            print(f"llama.cpp (llama-cpp-python {llama.info['version']}) load {llama.info['load_s']:.1f} s; "
                  f"{'REPACKED: ' + '; '.join(llama.repack) if llama.repack else 'no repacked buffer'}")
            print(f"  {llama.info['system_info']}")
            engines.append({"name": "llama.cpp", "alpha": 1.0, "decode": lambda k: llama.decode(ids, k),
                            "prefill": llama.prefill,
                            "kept": lambda i: tuple(range(L))})
        except Exception as e:  # noqa: BLE001
            why = f"llama.cpp failed: {str(e)[:300]}"
    if why:
        notes["llama.cpp"] = why
        print(f"llama.cpp: {why}")

    for e in engines:                         # warm-up, and the greedy tokens of a full run
        e["decode"](2)
        e["tokens"] = e["decode"](n)[1]
        if e["prefill"] and P:
            e["prefill"](pp_ids)
        e["rates"], e["pp"] = [], []
    bws = []
    for r in range(args.reps):
        bws.append(read_bandwidth())
        k = r % max(1, len(engines))
        for e in engines[k:] + engines[:k]:
            t1, _ = e["decode"](1)
            tn, _ = e["decode"](n)
            e["rates"].append((n - 1) / (tn - t1))
        for e in engines[k:] + engines[:k]:
            if e["prefill"] and P:
                e["pp"].append(P / e["prefill"](pp_ids))
        print(f"  round {r + 1}: read {bws[-1]:.1f} GB/s; " +
              "; ".join(f"{e['name']} {e['rates'][-1]:.1f}" + (f" (pp {e['pp'][-1]:.0f})" if e["pp"] else "")
                        for e in engines), flush=True)
    bw = med(bws)
    env["loadavg_end"] = os.getloadavg()
    if max(env["loadavg_start"][0], env["loadavg_end"][0]) > threads + 0.5:
        print(f"WARNING: load average {env['loadavg_start'][0]:.1f} at the start, {env['loadavg_end'][0]:.1f} at the end, "
              f"on {os.cpu_count()} CPUs: other work shared the cores; only the paired ratios mean much")

    by = {e["name"]: e for e in engines}
    ref = by.get("llama.cpp")
    full = next((e for e in engines if e["name"].startswith("d3kernels") and e["alpha"] == 1.0), None)
    full_bytes = [fb.step(range(L)) for i in range(1, n)]
    rows = []
    print(f"\nread bandwidth {bw:.1f} GB/s (median of {len(bws)}: {min(bws):.1f}-{max(bws):.1f}); "
          f"prompt {len(ids)} tokens; decode tokens/s median of {args.reps} rounds (min-max)")
    print(f"{'engine':30s} {'tok/s':>7s} {'(min-max)':>13s} {'MB/tok':>7s} {'of BW':>6s} {'vs llama':>8s}  note")
    for e in engines:
        layers = [len(e["kept"](i)) for i in range(n)]
        per = [fb.step(e["kept"](i)) for i in range(1, n)]
        nbytes = sum(per) / (n - 1)
        tps = med(e["rates"])
        frac = med([rt * nbytes / 1e9 / b for rt, b in zip(e["rates"], bws)])
        vs = med([a / b for a, b in zip(e["rates"], ref["rates"])]) if ref and e is not ref else None
        row = {"engine": e["name"], "alpha": e["alpha"], "tokens_per_s": tps, "rates": e["rates"],
               "bytes_per_token": nbytes, "fraction_of_read_bw": frac, "vs_llama_cpp": vs,
               "mean_layers": sum(layers[1:]) / (n - 1), "pp_tokens_per_s": med(e["pp"]) if e["pp"] else None,
               "pp_rates": e["pp"], "greedy_tokens": e["tokens"]}
        note = []
        if e["name"].startswith("d3kernels") and held:
            h = sum(sum(held[0][l] for l in e["kept"](i)) + held[1] for i in range(1, n)) / (n - 1)
            row["bytes_per_token_as_held"] = h
            if abs(h - nbytes) > 0.02 * nbytes:
                note.append(f"holds {h / 1e6:.0f} MB/token as loaded")
        if e["alpha"] != 1.0 and full:
            real = med([a / b for a, b in zip(e["rates"], full["rates"])])
            ideal = sum(full_bytes) / sum(per)
            row.update(real_speedup=real, ideal_speedup=ideal, real_over_ideal=real / ideal)
            note.append(f"{row['mean_layers']:.1f} of {L} layers; D3 {real:.2f}x, ideal {ideal:.2f}x by bytes "
                        f"({real / ideal:.0%} of ideal)")
        if ref and e is not ref:
            same = next((i for i, (a, b) in enumerate(zip(e["tokens"], ref["tokens"])) if a != b), None)
            row["greedy_first_diff_vs_llama_cpp"] = same
            note.append("greedy tokens = llama.cpp's" if same is None else f"greedy differs from llama.cpp's at token {same}")
        if e is ref or e is full:
            note.append(f"{len(set(e['tokens']))} distinct of {n} tokens")
        rows.append(row)
        print(f"{e['name']:30s} {tps:7.1f} {min(e['rates']):6.1f}-{max(e['rates']):<6.1f} {nbytes / 1e6:7.1f} "
              f"{frac:6.1%} {(f'{vs:.2f}x' if vs else ''):>8s}  {'; '.join(note)}")
    for name, why in notes.items():
        rows.append({"engine": name, "tokens_per_s": None, "note": why})
        print(f"{name:30s}    skip  {why}")
    pp = [e for e in engines if e["pp"]]
    if pp:
        print(f"\nprompt processing, {P} tokens (median of {args.reps}, min-max)")
        for e in pp:
            vs = med([a / b for a, b in zip(e["pp"], ref["pp"])]) if ref and e is not ref and ref["pp"] else None
            print(f"{e['name']:30s} {med(e['pp']):7.1f} {min(e['pp']):6.1f}-{max(e['pp']):<6.1f}"
                  f"{f'  {vs:.2f}x llama.cpp' if vs else ''}")
    if llama:
        llama.close()

    if embedded and model is not None:       # the earlier peers, not paired (slow; float32 weights)
        print("\nunpaired peers on the embedded file (float32 weights), best of 3:")
        from d3kernels.speed import step_bytes

        def rate(run):
            run(2)
            best = 0.0
            for _ in range(3):
                t = time.perf_counter()
                run(1)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                run(n)
                best = max(best, (n - 1) / (time.perf_counter() - t - t1))
            return best
        dense = model.dequantized(torch.float32)
        for alpha in [1.0] + alphas:
            sched = D3Schedule(L, alpha=alpha)
            dec = Decoder(dense, sched, max_seq_len=max_seq, backend="reference")
            tps = rate(lambda k: dec.generate([ids], k, ignore_eos=True))
            nb = sum(step_bytes(model.config, len(sched.kept_layers(i)), len(ids) + i, 4) for i in range(1, n)) / (n - 1)
            rows.append({"engine": f"d3kernels reference fp32, alpha {alpha}", "tokens_per_s": tps, "bytes_per_token": nb,
                         "fraction_of_read_bw": tps * nb / 1e9 / bw})
            print(f"{rows[-1]['engine']:30s} {tps:7.1f}   {nb / 1e6:7.1f} MB/token {tps * nb / 1e9 / bw:6.1%}")
        try:
            import transformers
            transformers.utils.logging.disable_progress_bar()
            hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                                   dtype=torch.float32)
            t_ids = torch.tensor([ids])
            tps = rate(lambda m: hf.generate(t_ids, max_new_tokens=m, min_new_tokens=m, do_sample=False))
            nb = sum(p.numel() * p.element_size() for p in hf.parameters())
            rows.append({"engine": "HF transformers fp32", "tokens_per_s": tps, "bytes_per_token": nb,
                         "fraction_of_read_bw": tps * nb / 1e9 / bw})
            print(f"{'HF transformers fp32':30s} {tps:7.1f}   {nb / 1e6:7.1f} MB/token {tps * nb / 1e9 / bw:6.1%}")
        except Exception as e:  # noqa: BLE001
            print(f"HF transformers fp32: skipped: {type(e).__name__}: {e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "read_bw_gbps": bw, "read_bw_runs": bws, "tokens": n, "prompt_tokens": len(ids),
                       "pp_tokens": P, "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
