"""The `d3kernels` command line: generate, info (and eval / calibrate, see d3kernels.eval)."""
from __future__ import annotations

import argparse
import sys
import time


def _log(msg: str) -> None:
    print(f"[d3kernels] {msg}", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference", "cuda-emu"])


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=0.998, help="depth decay per token, in (0, 1]; 1 = full depth")
    p.add_argument("--start", type=float, default=0.5, help="fraction of layers in the head core")
    p.add_argument("--tail", type=int, default=1, help="layers in the tail core")
    p.add_argument("--order", default="bottom",
                   help="skip order: bottom, top, calibrated (measured on the model, cached), or a layer list i,j,...")


def _order(s: str):
    return [int(x) for x in s.split(",")] if "," in s or s.isdigit() else s


def load(args):
    from .model import load_model
    t = time.perf_counter()
    m = load_model(args.model, device=args.device, dtype=args.dtype)
    _log(f"loaded {m.config.name} ({m.config.num_layers} layers, {m.dtype}, {m.device}) "
         f"in {time.perf_counter() - t:.1f} s")
    return m


def cmd_generate(args) -> int:
    from .decoder import Decoder
    from .generate import encode_prompt
    from .schedule import D3Schedule
    from .speed import ideal_speedup

    model = load(args)
    order = _order(args.order)
    if order == "calibrated":
        from .calibrate import calibrate_skip_order
        order = calibrate_skip_order(model, start=args.start, tail=args.tail)
        _log(f"calibrated skip order: {order}")
    sched = D3Schedule(model.config.num_layers, alpha=args.alpha, start=args.start, tail=args.tail,
                       skip_order=order)
    ids = encode_prompt(model, args.prompt, raw=args.raw)
    dec = Decoder(model, sched, max_batch=1, max_seq_len=len(ids) + args.max_new_tokens, backend=args.backend,
                  log=_log)
    _log(f"backend {dec.backend}, {sched}")
    tok = model.tokenizer
    new, shown = [], ""
    for toks in dec.stream([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, stop=args.stop):
        if toks[0] < 0:
            break
        new.append(toks[0])
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):           # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(flush=True)
    g = dec.last
    n = g.tokens.shape[1]
    layers = [len(k) for k in g.layers]
    print(f"[{n} tokens, {g.timings['tokens_per_s']:.1f} tokens/s, {sum(layers) / len(layers):.2f} of "
          f"{model.config.num_layers} layers per token, ideal speedup "
          f"{ideal_speedup(model.config, layers, len(ids), model.weights.wqkv.element_size()):.3f}x, "
          f"finished: {g.finished[0]}]", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import torch

    from . import __version__, _ops, backends
    print(f"d3kernels {__version__}")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    bi = _ops.build_info()
    if bi is None:
        print(f"_C: not built ({_ops.C_ERROR})")
    else:
        print(f"_C: built for CUDA archs {bi.get('cuda_archs')} with CUDA {bi.get('nvcc_version')}")
        ri = _ops.runtime_info()
        print(f"CUDA runtime: {ri if isinstance(ri, str) else ri}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"backends for {device} / {str(dtype).replace('torch.', '')}:")
    for name, ok, why in backends.report(device, dtype):
        print(f"  {name:10s} {'available' if ok else 'unavailable'}{'' if why == 'ok' else ': ' + why}")
    print(f"  auto -> {backends.resolve('auto', device, dtype)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d3kernels", description="Fast D3 (depth-decay) decoding.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text with D3")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_schedule_args(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="version, build and backend availability")
    i.set_defaults(func=cmd_info)
    try:
        from .eval import add_subcommands
        add_subcommands(sub, _add_model_args, _add_schedule_args)
    except ImportError:
        pass
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"d3kernels: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
