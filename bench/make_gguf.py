"""Synthetic Llama-shaped GGUFs at real scale, for the CPU side by side (bench/cpu_bench.py --gguf PATH).

gguf-py writes an F16 file with random weights (normal, std 0.02; norms near 1, float32) in the shape of
Llama-3.2-1B or -3B, with the vocabulary and `tokenizer.*` fields of the embedded model (49152 tokens), one
tensor at a time (memory stays at one tensor). llama.cpp's own quantizer (llama-cpp-python) then makes the
other types from it with its default recipe, so each file mixes types as published files do (Q4_0 and
the K-quants keep the tied embedding / lm_head in Q6_K; Q4_K_M puts attn_v and ffn_down in Q6_K in some
layers). A check decodes a few greedy tokens with llama.cpp and prints how many differ and the largest
logit, so a file whose activations blow up or whose output is one repeated token is caught here.

    python bench/make_gguf.py [--size 1b|3b] [--types Q4_0,Q8_0,Q4_K_M] [--out-dir /work/gguf]
                              [--drop-f16] [--force] [--no-check]

Files: OUT_DIR/llama-{size}-synthetic.{TYPE}.gguf. Existing files are kept (--force rewrites them).
Quantizing needs llama-cpp-python (`CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python`, a bench-only
dependency); without it only the F16 file is written.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from collections import Counter

import numpy as np

# name: (layers, hidden, heads, kv_heads, head_dim, ffn); tied embeddings, rope theta 500000, eps 1e-5
SHAPES = {
    "1b": (16, 2048, 32, 8, 64, 8192),       # Llama-3.2-1B
    "3b": (28, 3072, 24, 8, 128, 8192),      # Llama-3.2-3B
}
# llama.cpp's file types (enum llama_ftype)
FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
STD = 0.02
CONTEXT = 8192


def out_path(out_dir: str, size: str, qtype: str) -> str:
    return os.path.join(out_dir, f"llama-{size}-synthetic.{qtype}.gguf")


def tensor_list(size: str, vocab: int) -> list:
    """(name, numpy shape [rows, cols] or [n]) in file order, as llama.cpp's converter writes them."""
    L, d, H, H_kv, D, F = SHAPES[size]
    out = [("token_embd.weight", (vocab, d))]
    for l in range(L):
        out += [(f"blk.{l}.attn_norm.weight", (d,)), (f"blk.{l}.attn_q.weight", (H * D, d)),
                (f"blk.{l}.attn_k.weight", (H_kv * D, d)), (f"blk.{l}.attn_v.weight", (H_kv * D, d)),
                (f"blk.{l}.attn_output.weight", (d, H * D)), (f"blk.{l}.ffn_norm.weight", (d,)),
                (f"blk.{l}.ffn_gate.weight", (F, d)), (f"blk.{l}.ffn_up.weight", (F, d)),
                (f"blk.{l}.ffn_down.weight", (d, F))]
    return out + [("output_norm.weight", (d,))]


def random_tensor(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """A norm: float32 near 1 (1 + N(0, 0.02)). A matrix: float16 N(0, STD), made in 16 Mi-value slices."""
    if len(shape) == 1:
        return (1.0 + STD * rng.standard_normal(shape[0], dtype=np.float32)).astype(np.float32)
    out = np.empty(shape, dtype=np.float16)
    flat = out.reshape(-1)
    step = 1 << 24
    for i in range(0, flat.size, step):
        n = min(step, flat.size - i)
        flat[i:i + n] = rng.standard_normal(n, dtype=np.float32) * STD
    return out


def write_f16(path: str, size: str, seed: int) -> None:
    import gguf
    from d3kernels.model import embedded_model_path
    L, d, H, H_kv, D, F = SHAPES[size]
    src = gguf.GGUFReader(embedded_model_path())
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(path + ".part", "llama")
    w.add_name(f"llama-{size}-synthetic")
    w.add_block_count(L)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(d)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(H_kv)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(FTYPES["F16"])
    for name, f in src.fields.items():
        if name.startswith("tokenizer."):
            if f.types[0] == gguf.GGUFValueType.ARRAY:
                w.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1])
            else:
                w.add_key_value(name, f.contents(), f.types[0])
    tensors = tensor_list(size, vocab)
    for name, shape in tensors:
        dt = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for i, (name, shape) in enumerate(tensors):
        w.write_tensor_data(random_tensor(np.random.default_rng([seed, i]), shape))
        if name.endswith("ffn_down.weight") or i == 0:
            print(f"  wrote {name:28s} {time.perf_counter() - t0:6.1f} s", flush=True)
    w.close()
    os.replace(path + ".part", path)


def quantize(src: str, dst: str, qtype: str) -> None:
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[qtype]
    rc = llama_cpp.llama_model_quantize(src.encode(), (dst + ".part").encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")
    os.replace(dst + ".part", dst)


def type_mix(path: str) -> str:
    """The storage types of the file's matrices, with counts, e.g. 'Q4_0 x112, Q6_K x1'."""
    import gguf
    r = gguf.GGUFReader(path)
    c = Counter(t.tensor_type.name for t in r.tensors if len(t.shape) == 2)
    return ", ".join(f"{k} x{v}" for k, v in c.most_common())


def check(path: str, n: int = 24) -> str:
    """Greedy-decode n tokens with llama.cpp from a short prompt: distinct tokens and the largest |logit|."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=os.cpu_count(), logits_all=True, verbose=False)
    ids = llm.tokenize(b"The capital of France is")
    out, biggest = [], 0.0
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        if not np.all(np.isfinite(logits)):
            return f"NON-FINITE logits after {len(out)} tokens"
        biggest = max(biggest, float(np.abs(logits).max()))
        if len(out) >= n:
            break
    del llm
    return f"{len(set(out))} distinct of {n} greedy tokens, max |logit| {biggest:.2f}, first {out[:8]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K_M",
                    help=f"comma-separated llama.cpp types to make from the F16 file ({', '.join(FTYPES)})")
    ap.add_argument("--out-dir", default="/work/gguf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-f16", action="store_true", help="delete the F16 file after quantizing")
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    ap.add_argument("--no-check", action="store_true", help="skip the greedy decode check")
    args = ap.parse_args()
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    bad = [t for t in types if t not in FTYPES]
    if bad:
        sys.exit(f"unknown type(s) {bad}; known: {', '.join(FTYPES)}")
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        import llama_cpp
        version = getattr(llama_cpp, "__version__", "?")
    except ImportError:
        llama_cpp, version = None, None

    f16 = out_path(args.out_dir, args.size, "F16")
    done = []                                   # (path, wall seconds, CPU seconds of this process's threads)
    t, c = time.perf_counter(), time.process_time()
    if args.force or not os.path.exists(f16):
        print(f"writing {f16} (gguf-py, random F16, seed {args.seed})", flush=True)
        write_f16(f16, args.size, args.seed)
        done.append((f16, time.perf_counter() - t, time.process_time() - c))
    else:
        print(f"{f16} exists (--force rewrites it)")
    if llama_cpp is None:
        print("llama_cpp is not installed: quantized types skipped "
              "(CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
        types = [q for q in types if q == "F16"]
    else:
        print(f"llama-cpp-python {version}")
    for q in types:
        if q == "F16":
            continue
        dst = out_path(args.out_dir, args.size, q)
        if os.path.exists(dst) and not args.force:
            print(f"{dst} exists (--force rewrites it)")
            continue
        print(f"quantizing to {q} (llama.cpp ftype {FTYPES[q]}) ...", flush=True)
        t, c = time.perf_counter(), time.process_time()
        quantize(f16, dst, q)
        done.append((dst, time.perf_counter() - t, time.process_time() - c))
        print(f"  {done[-1][1]:.1f} s ({done[-1][2]:.1f} CPU s)", flush=True)
    if args.drop_f16 and llama_cpp is not None:
        os.remove(f16)
        print(f"deleted {f16}")

    print(f"\n{'file':36s}     GB  wall s   CPU s  matrices (load average {os.getloadavg()[0]:.1f})")
    for path, secs, cpu in done:
        if os.path.exists(path):
            print(f"{os.path.basename(path):36s} {os.path.getsize(path) / 1e9:6.3f} {secs:7.1f} {cpu:7.1f}  {type_mix(path)}")
    if llama_cpp is not None and not args.no_check:
        for q in types:
            path = out_path(args.out_dir, args.size, q)
            if os.path.exists(path):
                t = time.perf_counter()
                print(f"check {os.path.basename(path)}: {check(path)} ({time.perf_counter() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
