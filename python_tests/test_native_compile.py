"""Native compile checks that need no GPU (TOOLCHAIN.md, "Without a GPU").

- Triton: every kernel in d3kernels/triton/ compiles for sm_90 with the exact specializations and
  grids the host wrappers launch at four real model shapes (native_compile_triton.py, in a
  subprocess because this process interprets Triton). Prints grid, warps, registers, spills and
  shared memory per launch.
- CUDA: the sm_90 SASS of the built d3kernels/_C: per kernel registers, stack and LDL/STL, and no
  local-memory traffic inside any GEMV weight loop (the loop around the LDG.E.NA.128 weight loads).
- The SASS loop parser itself, on synthetic SASS, so the CUDA check is known to be able to fail.

The tables print to stdout: `pytest -rA python_tests/test_native_compile.py` shows them.
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import native_tools as nt

HERE = Path(__file__).resolve().parent
TRITON_DIR = HERE.parent / "d3kernels" / "triton"


# --------------------------------------------------------------------------- SASS parser (synthetic)

def _sass(body: str, name: str = "_Z4gemvv") -> str:
    """cuobjdump -sass layout: a Function header, then one "/*addr*/ instr ;  /* encoding */" per line."""
    lines = ["\tcode for sm_90", f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"']
    for i, ins in enumerate(x.strip() for x in body.strip().splitlines()):
        lines.append(f"        /*{16 * i:04x}*/                   {ins} ;      /* 0x000fe20000000800 */")
        lines.append("                                                          /* 0x000fc40000000f00 */")
    return "\n".join(lines) + "\n"


# 0x00 .. 0xf0: a weight loop [0x20, 0x90] (four loads back to back, then their consumers) inside an
# outer loop [0x10, 0xb0]; the trailing self-branch is the usual end-of-kernel padding.
WEIGHT_LOOP = """
    STL [R1], R0
    LDL R2, [R1]
    @!P1 LDG.E.NA.128.CONSTANT R40, desc[UR8][R12.64]
    @!P1 LDG.E.NA.128.CONSTANT R44, desc[UR8][R12.64+0x200]
    @!P2 LDG.E.NA.128.CONSTANT R48, desc[UR8][R14.64]
    @!P2 LDG.E.NA.128.CONSTANT R52, desc[UR8][R14.64+0x200]
    HADD2.F32 R60, -RZ, R41.H0_H0
    FFMA R3, R60, R70, R3
    IADD3 R12, P0, R12, 0x400, RZ
    @!P0 BRA 0x20
    FADD R4, R3, R4
    @!P3 BRA 0x10
    STG.E [R8.64], R4
    EXIT
    BRA 0xe0
    NOP
"""


def test_sass_parser_passes_a_clean_weight_loop():
    (name, ins), = nt.parse_sass(_sass(WEIGHT_LOOP)).items()
    r = nt.analyze(name, ins)
    assert (r.weight_loops, r.weight_loads, r.back_to_back) == (1, 4, 4)
    assert r.bad_loops == [] and nt.weight_loop_problems([r]) == []
    assert (r.n_local, r.local_store_bytes, r.local_load_bytes) == (2, 4, 4)
    assert r.outer_local == 1            # the LDL at 0x10 is in the outer loop, outside the weight loop


def test_sass_parser_fails_local_traffic_in_a_weight_loop():
    spilled = WEIGHT_LOOP.replace("FFMA R3, R60, R70, R3", "LDL.64 R70, [R1+0x8]")
    (name, ins), = nt.parse_sass(_sass(spilled)).items()
    r = nt.analyze(name, ins)
    assert len(r.bad_loops) == 1 and (r.bad_loops[0].start, r.bad_loops[0].end) == (0x20, 0x90)
    (msg,) = nt.weight_loop_problems([r])
    assert "LDL.64 R70, [R1+0x8]" in msg and "[0x20, 0x90]" in msg
    assert r.local_load_bytes == 4 + 8


def test_sass_parser_counts_loads_up_to_the_first_use():
    # the second load's result is used before the third is issued: at most 2 in flight
    body = WEIGHT_LOOP.replace("@!P2 LDG.E.NA.128.CONSTANT R48, desc[UR8][R14.64]\n",
                               "FMUL R61, R46, R46\n    @!P2 LDG.E.NA.128.CONSTANT R48, desc[UR8][R14.64]\n")
    body = body.replace("BRA 0xe0", "BRA 0xf0")          # the padding branch moved down one slot
    (name, ins), = nt.parse_sass(_sass(body)).items()
    r = nt.analyze(name, ins)
    assert r.back_to_back == 2 and r.weight_loads == 4
    # not a weight load: cached, or not 128-bit
    assert not nt.is_weight_load(nt.Instr(0, "", "LDG.E.128.CONSTANT", "R4, desc[UR4][R2.64]"))
    assert not nt.is_weight_load(nt.Instr(0, "", "LDG.E.NA.64", "R4, desc[UR4][R2.64]"))


def test_resource_usage_parser():
    text = """
Fatbin ptx code:
================
arch = sm_90

Fatbin elf code:
================
arch = sm_80
Resource usage:
 Function _Z1fv:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:356 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
Resource usage:
 Common:
  GLOBAL:0
 Function _Z1fv:
  REG:96 STACK:16 SHARED:4096 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert nt.parse_resource_usage(text) == {"_Z1fv": {"REG": 96, "STACK": 16, "SHARED": 4096, "LOCAL": 0,
                                                       "CONSTANT[0]": 656, "TEXTURE": 0, "SURFACE": 0,
                                                       "SAMPLER": 0}}
    assert nt.parse_resource_usage(text, "sm_80")["_Z1fv"]["REG"] == 40


# --------------------------------------------------------------------------- Triton, compiled natively

def _launched_triton_kernels() -> set[str]:
    """Names of @triton.jit functions that host code launches as `kernel[grid](...)`."""
    jitted, launched = set(), set()
    trees = [ast.parse(p.read_text()) for p in sorted(TRITON_DIR.glob("*.py"))]
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                jitted.add(node.name)
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in jitted:
                launched.add(node.func.value.id)
    return launched


def test_triton_kernels_compile_natively_for_sm90(tmp_path):
    pytest.importorskip("triton")
    if nt.triton_nvidia_bin("cuobjdump") is None:
        pytest.skip("Triton's cuobjdump (site-packages/triton/backends/nvidia/bin/) is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_json, out_md = tmp_path / "native_triton.json", tmp_path / "native_triton.md"
    t0 = time.time()
    # batch 1 (decode) and 16 (a full batch tile): the two specializations of B the JIT makes
    proc = subprocess.run([sys.executable, str(HERE / "native_compile_triton.py"), "--batches", "1,16",
                           "--json", str(out_json), "--md", str(out_md)],
                          env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    print(f"(native Triton compile: {time.time() - t0:.0f} s; report in {out_md})")
    assert proc.returncode == 0, f"native compile failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    res = json.loads(out_json.read_text())
    rows = res["rows"]
    assert res["failures"] == [] and all(r["ok"] and r["grid_ok"] for r in rows)
    compiled = {r["kernel"] for r in rows}
    missing = _launched_triton_kernels() - compiled
    assert not missing, f"kernels launched in d3kernels/triton but never recorded/compiled: {sorted(missing)}"
    combos = {(r["shape"], r["dtype"], r["B"]) for r in rows}
    assert len(combos) == 4 * 2 * 2, sorted(combos)
    assert all(isinstance(r["regs"], int) and r["regs"] > 0 for r in rows)


# --------------------------------------------------------------------------- CUDA: SASS of d3kernels._C

def _c_library() -> str | None:
    spec = importlib.util.find_spec("d3kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so")))
    return libs[0] if libs else None


def _short(name: str) -> str:
    """`void d3k::gemv_kernel<d3k::MlpDownOp, __half, 8, 1, 8>(d3k::MlpDownOp::Params)` ->
    `gemv_kernel<MlpDownOp, __half, 8, 1, 8>`."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "").split("(")[0]
    return name.replace("d3k::", "")


def test_cuda_sass_no_local_memory_in_weight_loops():
    lib = _c_library()
    if lib is None:
        pytest.skip("d3kernels._C is not built (no d3kernels/_C*.so)")
    tool = nt.triton_nvidia_bin("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump: it ships with Triton in site-packages/triton/backends/nvidia/bin/")
    elves = nt.cuobjdump(lib, "--list-elf", tool=tool)
    if "sm_90" not in elves:
        pytest.skip(f"{os.path.basename(lib)} has no sm_90 code (ELF sections: "
                    f"{sorted(set(w for w in elves.split() if w.endswith('.cubin')))[:5]} ...)")
    t0 = time.time()
    usage = nt.parse_resource_usage(nt.cuobjdump(lib, "--dump-resource-usage", "-arch", "sm_90", tool=tool))
    reports = [nt.analyze(name, ins) for name, ins in nt.cuobjdump_sass_stream(lib, "-arch", "sm_90", tool=tool)]
    names = nt.demangle([r.name for r in reports])
    rows = []
    for r in sorted(reports, key=lambda r: names[r.name]):
        u = usage.get(r.name.split("#")[0], {})
        rows.append([_short(names[r.name]), u.get("REG", "?"), u.get("STACK", "?"),
                     f"{r.local_store_bytes}/{r.local_load_bytes}" if r.n_local else "0/0",
                     r.weight_loads if r.weight_loops else "-", r.back_to_back if r.weight_loops else "-",
                     r.outer_local, len(r.bad_loops)])
    header = ["kernel (sm_90)", "regs", "stack", "STL/LDL bytes", "weight LDG/iter", "back to back",
              "LDL/STL in enclosing loop", "bad weight loops"]
    spilling = [row[0] for row in rows if row[3] != "0/0"]
    gemv = [r for r in reports if r.weight_loops]
    print(f"{os.path.basename(lib)}: {len(reports)} sm_90 kernels, {len(gemv)} with a vectorized weight loop "
          f"(LDG.E.NA.128); read in {time.time() - t0:.0f} s")
    print(nt.markdown_table(header, rows))
    print(f"kernels with local-memory traffic: {', '.join(spilling) or 'none'}")
    print("back-to-back weight loads per loop: " + ", ".join(
        f"{n} x {k}" for k, n in sorted({(r.back_to_back, sum(x.back_to_back == r.back_to_back for x in gemv))
                                         for r in gemv})))
    assert len(reports) > 0 and len(usage) > 0
    assert gemv, "no kernel has an LDG.E.NA.128 weight loop: the GEMV loads changed form, so this check " \
                 "checks nothing; update native_tools.is_weight_load"
    problems = nt.weight_loop_problems(reports, {k: _short(v) for k, v in names.items()})
    assert not problems, "\n".join(problems)
