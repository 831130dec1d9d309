"""The `d3kernels` command line: generate, info, selftest, eval, calibrate, export, serve.

The top layer: it imports the library modules (lazily, per command) and no
library module imports it. eval and calibrate report what d3kernels.eval and
d3kernels.calibrate compute.
"""
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
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "cpu", "reference", "cuda-emu"])


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    from .schedule import DEFAULTS
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"],
                   help="depth decay per token, in (0, 1]; 1 = full depth")
    p.add_argument("--start", type=float, default=DEFAULTS["start"], help="fraction of layers in the head core")
    p.add_argument("--tail", type=int, default=DEFAULTS["tail"], help="layers in the tail core")
    p.add_argument("--order", default=DEFAULTS["skip_order"],
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


def _schedule(args, model):
    """The D3Schedule of the schedule arguments (--alpha, --start, --tail, --order; "calibrated" runs the
    calibration on the model first)."""
    from .schedule import D3Schedule
    order = _order(args.order)
    if order == "calibrated":
        from .calibrate import calibrate_skip_order
        order = calibrate_skip_order(model, start=args.start, tail=args.tail)
        _log(f"calibrated skip order: {order}")
    return D3Schedule(model.config.num_layers, alpha=args.alpha, start=args.start, tail=args.tail,
                      skip_order=order)


def cmd_generate(args) -> int:
    from .decoder import Decoder
    from .generate import encode_prompt
    from .speed import ideal_speedup

    model = load(args)
    sched = _schedule(args, model)
    ids = encode_prompt(model, args.prompt, raw=args.raw)
    dec = Decoder(model, sched, max_batch=1, max_seq_len=len(ids) + args.max_new_tokens, backend=args.backend,
                  log=_log)
    _log(f"backend {dec.backend}, {sched}")
    tok = model.tokenizer
    if args.speculative:
        return _generate_speculative(args, model, dec, ids)
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


def _generate_speculative(args, model, dec, ids) -> int:
    """generate --speculative K: lossless D3 (the schedule drafts, full depth verifies); prints per round."""
    tok, shown = model.tokenizer, [""]

    def show(rows):
        text = tok.decode(rows[0], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(shown[0]):], end="", flush=True)
            shown[0] = text
    g = dec.generate([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed, stop=args.stop, speculative=args.speculative, on_token=show)
    print(flush=True)
    s, L = g.speculation, model.config.num_layers
    n = int((g.tokens[0] >= 0).sum())
    passes = (s["draft_layer_passes"] + s["verify_layer_passes"]) / max(1, n - 1)
    print(f"[{n} tokens, {g.timings['tokens_per_s']:.1f} tokens/s, lossless (full-depth output): {s['rounds']} "
          f"rounds, acceptance {s['acceptance']:.2f}, {passes:.1f} layer passes per token ({passes / L:.2f}x full "
          f"depth; draft {s['draft_layer_passes']}, verify {s['verify_layer_passes']}), finished: {g.finished[0]}]",
          file=sys.stderr)
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
    print(f"  auto -> {backends.resolve('auto', device, dtype, first_use=False)}")
    from .verify import records
    recs = records()
    print("selftest records (d3kernels selftest):" if recs else "selftest records: none")
    for r in recs:
        failed = [c["case"] for c in r.get("cases", []) if not c["passed"]]
        dev = r.get("device", {})
        print(f"  {r.get('backend')} on {dev.get('name')} ({dev.get('capability', dev.get('machine'))}), build "
              f"{r.get('build_id')}, {r.get('date')}: {'PASS' if r.get('passed') else 'FAIL'} "
              f"({len(r.get('cases', [])) - len(failed)}/{len(r.get('cases', []))} cases"
              f"{'; failed: ' + ', '.join(failed[:5]) if failed else ''}) {r.get('path')}")
    return 0


def cmd_selftest(args) -> int:
    import torch

    from . import backends, selftest
    device = args.device or ("cuda" if torch.cuda.is_available() and args.backend != "cuda-emu" else "cpu")
    names = (["cuda", "triton"] if args.backend == "all" else [args.backend])
    cfg = None
    if args.model is not None:
        from .model import load_model
        cfg = load_model(args.model, device="cpu", dtype=torch.float32).config
    ok = True
    for name in names:
        reason = backends.why_not(name, device, torch.bfloat16, None if cfg is None else cfg.head_dim)
        if reason is not None:
            print(f"[selftest] {name}: cannot run here: {reason}", file=sys.stderr)
            ok = False
            continue
        rec = selftest.run(name, device, model=cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
        if not rec["passed"]:
            ok = False
            print(selftest.BUG_REPORT.format(path=rec.get("path")), file=sys.stderr)
    return 0 if ok else 1


# --------------------------------------------------------------------------- eval, calibrate

def _list(values, cast, name):
    """Parse repeated and/or comma-separated CLI values."""
    out = []
    for v in values:
        for x in str(v).split(","):
            if x.strip():
                try:
                    out.append(cast(x.strip()))
                except ValueError:
                    raise ValueError(f"--{name}: cannot read {x.strip()!r} as {cast.__name__}") from None
    return out


def _cli_prompts(args) -> list:
    from .calibrate import builtin_prompts, read_prompts
    prompts = read_prompts(args.prompts) if args.prompts else builtin_prompts()
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
        prompts = prompts[: args.num_prompts]
    return prompts


def _set_threads(n) -> None:
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch
    torch.set_num_threads(n)


def cmd_eval(args) -> int:
    import json
    import os

    from .eval import DEFAULT_NUM_PROMPTS, check_grid, best_setting, evaluate, format_table, plot
    _set_threads(args.threads)
    alphas, starts, tails, orders, N = check_grid(
        _list(args.alphas, float, "alphas"), _list(args.starts, float, "starts"), _list(args.tails, int, "tails"),
        _list(args.orders, str, "orders"), args.max_new_tokens)
    if args.num_prompts is None and not args.prompts:
        args.num_prompts = DEFAULT_NUM_PROMPTS
    prompts = _cli_prompts(args)
    model = load(args)
    t = time.perf_counter()
    report = evaluate(model, prompts, alphas, starts, tails, orders, N, backend=args.backend)
    _log(f"{report['unique_runs']} distinct runs over {len(report['results'])} settings in "
         f"{time.perf_counter() - t:.1f} s")
    print(f"D3 quality on {report['model']}: {report['prompts']} prompts x {N} tokens "
          f"({report['scored_positions']} scored positions), full-depth perplexity {report['reference']['ppl']:.3f}")
    print(format_table(report))
    best = best_setting(report)
    if best is None:
        print("no setting keeps teacher-forced agreement >= 95% with a perplexity increase <= 5%")
    else:
        print(f"fastest setting with teacher-forced agreement >= 95% and perplexity increase <= 5%: "
              f"order={best['order']} start={best['start']:g} tail={best['tail']} alpha={best['alpha']:g} "
              f"({best['ideal_speedup']:.3f}x ideal)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        _log(f"wrote {args.json}")
    png = args.plot if args.plot is not None else (os.path.splitext(args.json)[0] + ".png" if args.json else "")
    if png and png != "none":
        if plot(report, png) is None:
            _log("matplotlib is not installed: no plot (pip install matplotlib)")
        else:
            _log(f"wrote {png}")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import cache_path, calibrate_skip_order
    _set_threads(args.threads)
    prompts = _cli_prompts(args) if (args.prompts or args.num_prompts is not None) else None
    model = load(args)
    order, sims = calibrate_skip_order(model, prompts, start=args.start, tail=args.tail,
                                       max_new_tokens=args.max_new_tokens, recompute=args.force,
                                       backend=args.backend, return_similarity=True)
    print("layer  input/output cosine similarity")
    for l, s in enumerate(sims):
        print(f"{l:5d}  {s:.4f}{'  (flex)' if l in order else ''}")
    print(f"skip order (most redundant first), start={args.start:g} tail={args.tail}:")
    print(",".join(str(l) for l in order))
    print(f"cached in {cache_path(model)}", file=sys.stderr)
    return 0


def _add_eval_commands(sub) -> None:
    """The `eval` and `calibrate` subcommands."""
    from .eval import (DEFAULT_ALPHAS, DEFAULT_NUM_PROMPTS, DEFAULT_ORDERS, DEFAULT_STARTS, DEFAULT_TAILS,
                       DEFAULT_TOKENS, ORDERS)
    e = sub.add_parser("eval", help="measure D3 quality against full depth over a grid of settings")
    _add_model_args(e)
    e.add_argument("--prompts", default=None,
                   help="JSONL file with a \"prompt\" field, or text with one prompt per line "
                        f"(default: the first {DEFAULT_NUM_PROMPTS} built-in prompts)")
    e.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    e.add_argument("--alphas", nargs="+", default=[",".join(map(str, DEFAULT_ALPHAS))],
                   help=f"alpha values, space- or comma-separated (default {','.join(map(str, DEFAULT_ALPHAS))})")
    e.add_argument("--starts", nargs="+", default=[",".join(map(str, DEFAULT_STARTS))],
                   help=f"head-core fractions (default {','.join(map(str, DEFAULT_STARTS))})")
    e.add_argument("--tails", nargs="+", default=[",".join(map(str, DEFAULT_TAILS))],
                   help=f"tail-core sizes (default {','.join(map(str, DEFAULT_TAILS))})")
    e.add_argument("--orders", nargs="+", default=[",".join(DEFAULT_ORDERS)],
                   help=f"skip orders from {','.join(ORDERS)} (default: all)")
    e.add_argument("--max-new-tokens", type=int, default=DEFAULT_TOKENS, help="tokens per prompt (>= 2)")
    e.add_argument("--json", default="d3_eval.json", help="write the report here ('' to skip)")
    e.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png; 'none' to skip)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("calibrate", help="compute (and cache) a skip order from layer input/output similarity")
    _add_model_args(c)
    c.add_argument("--prompts", default=None, help="prompts file (default: the last 8 built-in prompts)")
    c.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    c.add_argument("--start", type=float, default=0.5, help="fraction of layers in the head core")
    c.add_argument("--tail", type=int, default=1, help="layers in the tail core")
    c.add_argument("--max-new-tokens", type=int, default=16, help="greedy decode steps measured per prompt")
    c.add_argument("--force", action="store_true", help="recompute even if cached")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    c.set_defaults(func=cmd_calibrate)


def cmd_export(args) -> int:
    from .model import save_hf
    if args.dtype is None and (args.device or "cpu") == "cpu":
        args.dtype = "fp32"         # float weights, not the packed ones the cpu backend reads
    model = load(args)
    save_hf(model, args.out)
    print(f"wrote {model.config.name} as a Hugging Face directory: {args.out}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .openai_api import serve

    if args.threads is not None:
        _set_threads(args.threads)
        from . import cpu
        if cpu.C is not None:       # the cpu backend took torch's count at import
            cpu.set_num_threads(args.threads)
    model = load(args)
    sched = _schedule(args, model)
    return serve(model, sched, host=args.host, port=args.port, model_id=args.served_model_name,
                 max_batch=args.max_batch, max_seq_len=min(args.max_seq_len, model.config.max_position),
                 page_size=args.page_size, num_pages=args.num_pages, max_queue=args.max_queue,
                 backend=args.backend, fill=args.fill, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, shutdown_grace_s=args.shutdown_grace, log=_log,
                 prefill_chunk=args.prefill_chunk)


def _add_serve_command(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming) on the "
                                     "continuous-batching Server")
    _add_model_args(s)
    _add_schedule_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (the log line names it)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots)")
    s.add_argument("--max-seq-len", type=int, default=2048, help="positions per request: prompt + max_tokens")
    s.add_argument("--page-size", type=int, default=16, help="positions per KV page")
    s.add_argument("--num-pages", type=int, default=None,
                   help="KV pages in the pool (default: every slot can reach --max-seq-len)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond that the server answers 429")
    s.add_argument("--fill", default="mask", choices=["mask", "project", "copy"])
    s.add_argument("--temperature", type=float, default=0.0, help="default of requests that set none (0 = greedy)")
    s.add_argument("--top-p", type=float, default=1.0, help="default of requests that set none")
    s.add_argument("--top-k", type=int, default=0, help="default of requests that set none (0 = off)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the decode ops (default: torch's choice; fewer leave cores to the HTTP side)")
    s.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens prefilled per step, so a long prompt delays the running requests a chunk at "
                        "a time (default: a prompt whole when it is admitted)")
    s.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds live requests may run on after SIGINT / SIGTERM before they are aborted")
    s.set_defaults(func=cmd_serve)


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
    g.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="lossless D3: draft K tokens per round at the schedule's depth, verify them at full depth "
                        "(the output is full-depth decoding's)")
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="version, build and backend availability")
    i.set_defaults(func=cmd_info)
    t = sub.add_parser("selftest", help="verify the GPU backends on this device against the reference, and "
                                        "record the result (auto uses a backend that passed)")
    t.add_argument("--backend", default="all", choices=["all", "cuda", "triton", "cpu", "cuda-emu"])
    t.add_argument("--model", default=None, help="also test this model's shapes (HF directory or .gguf)")
    t.add_argument("--device", default=None, help="default: cuda (cpu for cuda-emu)")
    t.set_defaults(func=cmd_selftest)
    x = sub.add_parser("export", help="write a model (default: the embedded one) as a Hugging Face directory, "
                                      "e.g. for vLLM")
    x.add_argument("out", help="directory to write (config.json, model.safetensors, tokenizer)")
    _add_model_args(x)
    x.set_defaults(func=cmd_export, device="cpu")
    _add_eval_commands(sub)
    _add_serve_command(sub)
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
