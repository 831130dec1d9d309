"""A/B of the cpu backend's kernels in one process: the native module built from another commit's cpu headers
(csrc/include/d3k/cpu/) beside the installed one, timed alternately on the same weights.

    python bench/cpu_ab.py REV [--types q4_0,q8_0] [--rounds 8] [--threads 2]

On a shared machine two runs of a benchmark minutes apart can differ by 20%; alternating the two builds in one
process, round by round, and taking the median of each round's own ratio is what settles a few percent. Three
shapes per type: the GEMV (one activation row against 16 matrices of 8192 x 2048, 150+ MB, so read from
memory as in decode), and the GEMM of 256 activation rows against 2048 x 8192 and 2048 x 2048 (prompts).
It also says whether the two builds' GEMM outputs are bit-equal (a change meant to keep the arithmetic).
Needs the CMake build of d3kernels._C_cpu (pip install -e .): only isa_avx2.cpp is recompiled.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_tests"))
import emu_variants  # noqa: E402  (the variant builder the planted-bug tests use)
from d3kernels import cpu, quant  # noqa: E402

HEADERS = ("formats.h", "kernels.h", "kernels_impl.h", "ops.h")


def build_at(rev: str, tmp: Path):
    """The _C_cpu module with csrc/include/d3k/cpu/ as of git revision `rev` (the rest as installed)."""
    if emu_variants.cpu_build_dir() is None:
        raise SystemExit("no CMake build of d3kernels._C_cpu under build/ (pip install -e .)")
    edits = {}
    for f in HEADERS:
        path = f"include/d3k/cpu/{f}"
        ours = (ROOT / "csrc" / path).read_text()
        theirs = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:csrc/{path}"],
                                capture_output=True, text=True, check=True).stdout
        if theirs != ours:
            edits[path] = [(ours, theirs)]     # the whole file, replaced
    return emu_variants.build_cpu_variant(tmp, edits, ["isa_avx2.cpp"], name="cpu_ab")


def linear(mod, x: torch.Tensor, w, y: torch.Tensor) -> None:
    """y [N, R] = x [N, K] @ W^T through module `mod`'s native linear."""
    mod.linear(y.data_ptr(), x.data_ptr(), w.data.data_ptr(), quant.CODES[w.qtype], w.data.shape[-1], 0,
               x.shape[0], w.shape[0], w.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the git revision whose cpu headers build the other module (e.g. HEAD~1)")
    ap.add_argument("--types", default="q4_0,q8_0,q4_K,q6_K")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if "avx2" not in cpu.C.build_info()["isas"]:
        raise SystemExit("this CPU lacks the avx2 instructions")
    tmp = Path(tempfile.mkdtemp(prefix="d3k_cpu_ab_"))
    try:
        mods = {a.rev: build_at(a.rev, tmp), "installed": cpu.C}
        for m in mods.values():
            m.set_num_threads(a.threads)
            m.set_isa("avx2")
        torch.manual_seed(0)
        print(f"{a.rev} against the installed module; {a.threads} threads, {a.rounds} alternating rounds")
        for qt in a.types.split(","):
            gemv_ws = [quant.quantize(torch.randn(8192, 2048) * 0.02, qt) for _ in range(16)]
            shapes = {"GEMV 16 x 8192 x 2048": (torch.randn(1, 2048), gemv_ws),
                      "GEMM 256 x 2048 x 8192": (torch.randn(256, 8192), [quant.quantize(torch.randn(2048, 8192) * 0.02, qt)]),
                      "GEMM 256 x 2048 x 2048": (torch.randn(256, 2048), [quant.quantize(torch.randn(2048, 2048) * 0.02, qt)])}
            rates = {(k, s): [] for k in mods for s in shapes}
            for rnd in range(a.rounds):
                for k in (list(mods) if rnd % 2 else list(mods)[::-1]):
                    for s, (x, ws) in shapes.items():
                        y = torch.empty(x.shape[0], ws[0].shape[0])
                        t = time.perf_counter()
                        for w in ws:
                            linear(mods[k], x, w, y)
                        dt = time.perf_counter() - t
                        work = sum(w.data.numel() for w in ws) if s.startswith("GEMV") else x.shape[0] * ws[0].shape[0] * ws[0].shape[1]
                        rates[(k, s)].append(work / dt / 1e9)
            x, ws = shapes["GEMM 256 x 2048 x 8192"]
            ys = [torch.empty(256, 2048) for _ in mods]
            for m, y in zip(mods.values(), ys):
                linear(m, x, ws[0], y)
            print(f"{qt}: GEMM outputs bit-equal: {torch.equal(*ys)}")
            for s in shapes:
                old, new = rates[(a.rev, s)], rates[("installed", s)]
                r = [n / o for o, n in zip(old, new)]
                unit = "GB/s" if s.startswith("GEMV") else "G multiply-adds/s"
                print(f"  {s}: {a.rev} {statistics.median(old):.1f}, installed {statistics.median(new):.1f} {unit}; "
                      f"installed / {a.rev} per round: median {statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
