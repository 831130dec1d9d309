"""`d3kernels serve` under concurrent streaming clients: aggregate tokens/s, time to first token (TTFT) and time
per output token (TPOT), p50 / p99, at full depth and under D3, with llama-cpp-python's own server beside it
when one can be started.

    python bench/serve_bench.py [--streams 1,8,32] [--alphas 1,0.998] [--requests-per-stream 4]
                                [--max-tokens 64] [--threads N] [--model PATH] [--json OUT] [--rate R]
                                [--llama-python /venv/bin/python] [--smoke]

Each alpha and concurrency c gets its own server process (`d3kernels serve --max-batch c --alpha A`, the
embedded model unless --model; an idle slot costs the cpu backend nothing). c asyncio clients (the openai package, streaming chat
completions of the built-in prompts, temperature 0, ignore_eos so every request makes --max-tokens tokens)
run c x --requests-per-stream requests after a warm-up of c short ones: in bursts (each client sends its
next request when its last one ends), or with --rate R at Poisson arrival times (R requests/s, seeded; the
server queues what its c slots cannot take, so TTFT includes the wait). Per request: TTFT = first token's
arrival - send; TPOT = (last token's arrival - first's) / (tokens - 1); gap = the longest wait between two of
its tokens (what a newcomer's prefill adds to the running requests). Aggregate tokens/s = all tokens / the
wall time from the first send to the last token. The rows are appended to --json (one object per setting).

llama.cpp's anchor is `PYTHON -m llama_cpp.server` on the same GGUF file (PYTHON: --llama-python,
D3K_LLAMA_PYTHON, or this interpreter when `llama_cpp.server` imports), with --interrupt_requests False (by
default a new request interrupts the running one); it serves one request at a time, and
its chat stream has no ignore_eos, so its requests may end early (its tokens are counted from the stream).
Without it the rows say why not.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_S = 300


def pct(xs: list, q: float) -> float:
    """The q-quantile (0..1) of xs, linear between order statistics."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = q * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


class Process:
    """A server child process whose log goes to a file; ready when `pattern` (with the port) appears."""

    def __init__(self, cmd: list, log_path: str, pattern: str, port=None):
        self.log_path, self.port = log_path, port
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < START_S:
            m = re.search(pattern, open(log_path).read())
            if m:
                self.port = self.port or int(m.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start: {' '.join(cmd)}\n{open(log_path).read()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


async def one(client, model: str, messages: list, max_tokens: int, d3k: bool) -> dict:
    t0 = time.perf_counter()
    arrivals = []
    extra = {"ignore_eos": True, "return_token_ids": True} if d3k else {}
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True, extra_body=extra)
    async for ch in stream:
        if not ch.choices:
            continue
        n = len((ch.choices[0].model_extra or {}).get("token_ids") or []) if d3k else int(bool(ch.choices[0].delta.content))
        arrivals += [time.perf_counter()] * n
    return {"t0": t0, "arrivals": arrivals}


async def run_level(url: str, model: str, prompts: list, streams: int, requests: int, max_tokens: int,
                    d3k: bool, rate: float = 0.0) -> dict:
    """Bursts (rate 0): `streams` clients, each sending its next request when the last one ends. Poisson
    arrivals (rate > 0 requests/s, seeded): every request is sent at its arrival time and the server queues
    what its slots cannot take, so TTFT includes the wait."""
    import openai
    import random
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(streams)
    rng, t, arrive = random.Random(0), 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        arrive.append(t)

    async def limited(k, n, at=None):
        msgs = [{"role": "user", "content": prompts[k % len(prompts)]}]
        if at is not None:
            await asyncio.sleep(at)
            return await one(client, model, msgs, n, d3k)
        async with sem:
            return await one(client, model, msgs, n, d3k)
    try:
        await asyncio.gather(*(limited(k, 4) for k in range(streams)))                 # warm-up
        res = await asyncio.gather(*(limited(k, max_tokens, arrive[k] if rate > 0 else None)
                                     for k in range(requests)))
    finally:
        await client.close()
    ttft = [r["arrivals"][0] - r["t0"] for r in res if r["arrivals"]]
    tpot = [(r["arrivals"][-1] - r["arrivals"][0]) / (len(r["arrivals"]) - 1) for r in res if len(r["arrivals"]) > 1]
    gap = [max(b - a for a, b in zip(r["arrivals"], r["arrivals"][1:])) for r in res if len(r["arrivals"]) > 1]
    tokens = sum(len(r["arrivals"]) for r in res)
    wall = max(r["arrivals"][-1] for r in res if r["arrivals"]) - min(r["t0"] for r in res)
    return {"requests": requests, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "tpot_p50_ms": 1e3 * pct(tpot, 0.5), "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
            "max_gap_p50_ms": 1e3 * pct(gap, 0.5), "max_gap_p99_ms": 1e3 * pct(gap, 0.99)}


def llama_server_python(arg):
    """(interpreter with llama_cpp.server, None) or (None, why not)."""
    py = arg or sys.executable
    if not (shutil.which(py) or os.path.exists(py)):
        return None, f"{py} not found"
    ok = subprocess.run([py, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if ok.returncode == 0:
        return py, None
    last = (ok.stderr.strip().splitlines() or ["?"])[-1]
    return None, f"llama_cpp.server does not import in {py} ({last}); pip install 'llama-cpp-python[server]'"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--alphas", default="1,0.998")
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="the servers' CPU threads (default: torch's choice)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="d3kernels serve --prefill-chunk (default: the server's default)")
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    ap.add_argument("--json", default=None, help="append the rows to this JSON file")
    ap.add_argument("--llama-python", default=os.environ.get("D3K_LLAMA_PYTHON"))
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp anchor")
    ap.add_argument("--no-d3k", action="store_true", help="only the llama.cpp anchor")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="Poisson arrivals at this many requests/s (default 0: bursts of --streams clients)")
    ap.add_argument("--smoke", action="store_true", help="1 stream, 2 requests of 8 tokens, the default alpha")
    a = ap.parse_args(argv)
    if a.smoke:
        a.streams, a.alphas, a.requests_per_stream, a.max_tokens, a.no_llama = "1", "0.998", 2, 8, True
    streams = [int(x) for x in a.streams.split(",")]
    alphas = [float(x) for x in a.alphas.split(",")]
    from d3kernels.calibrate import builtin_prompts
    from d3kernels.model import embedded_model_path
    prompts = builtin_prompts()
    model_path = a.model or embedded_model_path()
    tmp = tempfile.mkdtemp(prefix="serve_bench-")
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "max_tokens": a.max_tokens, "requests_per_stream": a.requests_per_stream,
            "model": os.path.basename(model_path), "threads": a.threads,
            "load_avg_before": os.getloadavg()[0]}
    try:
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip()
    except OSError:
        pass
    rows = []

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:      # row by row, so a run that fails later keeps what it measured
            old = json.load(open(a.json)) if os.path.exists(a.json) else []
            json.dump(old + [row], open(a.json, "w"), indent=1)
    for alpha in ([] if a.no_d3k else alphas):
        for c in streams:
            # one server per level, with as many slots as streams
            cmd = [sys.executable, "-m", "d3kernels", "serve", "--model", model_path, "--port", "0", "--alpha",
                   str(alpha), "--max-batch", str(c), "--max-seq-len", "512",
                   "--max-queue", str(c * a.requests_per_stream + 8)]
            cmd += ["--threads", str(a.threads)] if a.threads else []
            cmd += ["--prefill-chunk", str(a.prefill_chunk)] if a.prefill_chunk else []
            srv = Process(cmd, os.path.join(tmp, f"d3k-{alpha}-{c}.log"), r"serving \S+ on http://127\.0\.0\.1:(\d+)")
            try:
                model_id = re.search(r"serving (\S+) on", open(srv.log_path).read()).group(1)
                r = asyncio.run(run_level(f"http://127.0.0.1:{srv.port}", model_id, prompts, c,
                                          c * a.requests_per_stream, a.max_tokens, True, a.rate))
                add({**meta, "server": "d3kernels", "alpha": alpha, "streams": c, "slots": c, "rate": a.rate,
                     "prefill_chunk": a.prefill_chunk, **r})
            finally:
                srv.stop()
    if not a.no_llama:
        py, why = llama_server_python(a.llama_python)
        if py is None:
            add({**meta, "server": "llama-cpp-python", "skipped": why})
        else:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [py, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1", "--port", str(port),
                   "--n_ctx", "512", "--model_alias", "gguf", "--interrupt_requests", "False"]
            cmd += ["--n_threads", str(a.threads)] if a.threads else []
            try:
                srv = Process(cmd, os.path.join(tmp, "llama.log"), r"(Uvicorn running)", port=port)
            except RuntimeError as e:
                add({**meta, "server": "llama-cpp-python", "skipped": str(e)[-400:]})
            else:
                try:
                    for c in streams:
                        r = asyncio.run(run_level(f"http://127.0.0.1:{port}", "gguf", prompts, c,
                                                  c * a.requests_per_stream, a.max_tokens, False, a.rate))
                        add({**meta, "server": "llama-cpp-python", "alpha": 1.0, "streams": c, "rate": a.rate, **r})
                finally:
                    srv.stop()
    print(f"\n{'server':18s} {'alpha':>6s} {'streams':>7s} {'tok/s':>8s} {'TTFT p50':>9s} {'p99':>8s} "
          f"{'TPOT p50':>9s} {'p99':>8s} {'gap p50':>8s} {'p99':>8s}  (ms)")
    for r in rows:
        if "skipped" in r:
            print(f"{r['server']:18s} skipped: {r['skipped']}")
            continue
        print(f"{r['server']:18s} {r['alpha']:6g} {r['streams']:7d} {r['tokens_per_s']:8.1f} {r['ttft_p50_ms']:9.1f} "
              f"{r['ttft_p99_ms']:8.1f} {r['tpot_p50_ms']:9.1f} {r['tpot_p99_ms']:8.1f} {r['max_gap_p50_ms']:8.1f} "
              f"{r['max_gap_p99_ms']:8.1f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
