"""Reading compiled GPU code without a GPU: Triton's bundled cuobjdump, resource usage, and a small
SASS parser (functions, loops, local-memory traffic, GEMV weight loads).

Used by test_native_compile.py and native_compile_triton.py. Pure Python plus subprocess calls;
no torch, so the SASS parser is unit-testable on synthetic text.
"""
from __future__ import annotations

import bisect
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Iterator


def triton_nvidia_bin(tool: str) -> str | None:
    """Path of a tool Triton ships (cuobjdump, nvdisasm, ptxas), or None. The CUDA toolkit on the
    CPU machines has no cuobjdump, Triton's wheel does (TOOLCHAIN.md)."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin", tool)
    return path if os.access(path, os.X_OK) else None


def cuobjdump(path: str, *args: str, tool: str | None = None) -> str:
    tool = tool or triton_nvidia_bin("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump (site-packages/triton/backends/nvidia/bin/cuobjdump) not found")
    return subprocess.run([tool, *args, path], check=True, capture_output=True, text=True).stdout


# --------------------------------------------------------------------------- resource usage

_FUNC_RU = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str, arch: str = "sm_90") -> dict[str, dict[str, int]]:
    """`cuobjdump --dump-resource-usage` -> {mangled function: {"REG": .., "STACK": .., "SHARED": ..,
    "LOCAL": .., ...}} for the ELF sections of `arch` (PTX sections carry no usage)."""
    out: dict[str, dict[str, int]] = {}
    cur_arch, in_elf, func = None, False, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Fatbin elf code"):
            in_elf, cur_arch = True, None
        elif s.startswith("Fatbin ptx code"):
            in_elf = False
        elif s.startswith("arch ="):
            cur_arch = s.split("=", 1)[1].strip()
        m = _FUNC_RU.match(line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in s:
            # a bare cubin has no "Fatbin" headers: accept it as the requested arch
            if (in_elf and cur_arch == arch) or cur_arch is None:
                out[func] = {k: int(v) for k, v in _FIELD.findall(s)}
            func = None
    return out


# --------------------------------------------------------------------------- SASS

_FUNC_SASS = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_REG = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(\.64)?(?![0-9])")
_HEX = re.compile(r"0x([0-9a-fA-F]+)")


@dataclass
class Instr:
    addr: int
    pred: str          # "" or e.g. "@!P5"
    opcode: str        # e.g. "LDG.E.NA.128.CONSTANT"
    operands: str

    @property
    def op(self) -> str:
        return self.opcode.split(".", 1)[0]

    def text(self) -> str:
        return f"{self.pred + ' ' if self.pred else ''}{self.opcode} {self.operands}".strip()


@dataclass(eq=False)
class Loop:
    start: int         # branch target (loop head)
    end: int           # address of the backward branch
    body: list[Instr] = field(default_factory=list)


def iter_sass(lines) -> Iterator[tuple[str, list[Instr]]]:
    """(mangled function, instructions in address order) for each function of `cuobjdump -sass`
    output, one function at a time, so a 170 MB dump never sits in memory whole."""
    name, cur = None, []
    for line in lines:
        m = _FUNC_SASS.match(line)
        if m:
            if name is not None:
                yield name, cur
            name, cur = m.group(1), []
            continue
        if name is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        pred = ""
        if body.startswith("@"):
            pred, _, body = body.partition(" ")
            body = body.strip()
        opcode, _, operands = body.partition(" ")
        cur.append(Instr(int(m.group(1), 16), pred, opcode, operands.strip()))
    if name is not None:
        yield name, cur


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """`cuobjdump -sass` text -> {mangled function: instructions}; a repeated name gets a "#n" suffix."""
    funcs: dict[str, list[Instr]] = {}
    for name, instrs in iter_sass(text.splitlines()):
        n, base = 1, name
        while name in funcs:
            n += 1
            name = f"{base}#{n}"
        funcs[name] = instrs
    return funcs


def cuobjdump_sass_stream(path: str, *args: str, tool: str | None = None):
    """Yields iter_sass() items straight from a cuobjdump -sass subprocess."""
    tool = tool or triton_nvidia_bin("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump (site-packages/triton/backends/nvidia/bin/cuobjdump) not found")
    with subprocess.Popen([tool, "-sass", *args, path], stdout=subprocess.PIPE, text=True) as proc:
        yield from iter_sass(proc.stdout)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, [tool, "-sass", *args, path])


def is_branch(ins: Instr) -> bool:
    return ins.op in ("BRA", "JMP")


def loops(instrs: list[Instr]) -> list[Loop]:
    """Every backward branch (target <= its own address) closes a loop [target, branch].
    `instrs` is in address order, as cuobjdump prints it."""
    addrs = [x.addr for x in instrs]
    found = []
    for i, ins in enumerate(instrs):
        if not is_branch(ins) or "[" in ins.operands:
            continue             # not a branch, or through a register / constant bank: no visible target
        hexes = _HEX.findall(ins.operands)
        if not hexes:
            continue
        target = int(hexes[-1], 16)
        if target <= ins.addr:
            found.append(Loop(target, ins.addr, instrs[bisect.bisect_left(addrs, target):i + 1]))
    return found


def is_weight_load(ins: Instr) -> bool:
    """The GEMV weight stream: LDG with .NA (no L1 allocate) and .128 (e.g. LDG.E.NA.128.CONSTANT)."""
    parts = ins.opcode.split(".")
    return parts[0] == "LDG" and "NA" in parts[1:] and "128" in parts[1:]


def is_local(ins: Instr) -> bool:
    """Local-memory traffic: spills and stack arrays (LDL / STL)."""
    return ins.op in ("LDL", "STL")


def local_bytes(ins: Instr) -> int:
    parts = ins.opcode.split(".")[1:]
    for width, nbytes in (("128", 16), ("64", 8), ("U8", 1), ("S8", 1), ("U16", 2), ("S16", 2)):
        if width in parts:
            return nbytes
    return 4


def _regs(operand_text: str) -> set[int]:
    regs = set()
    for num, pair in _REG.findall(operand_text):
        r = int(num)
        regs.add(r)
        if pair:
            regs.add(r + 1)
    return regs


def _dest_regs(ins: Instr) -> set[int]:
    first = ins.operands.split(",", 1)[0]
    m = _REG.search(first)
    if not m:
        return set()
    n = 4 if "128" in ins.opcode.split(".") else 2 if "64" in ins.opcode.split(".") else 1
    return set(range(int(m.group(1)), int(m.group(1)) + n))


def _src_regs(ins: Instr) -> set[int]:
    if ins.op.startswith(("ST", "RED")) or is_branch(ins):
        return _regs(ins.operands)           # stores: every operand is read
    parts = ins.operands.split(",", 1)
    return _regs(parts[1]) if len(parts) > 1 else set()


def back_to_back(body: list[Instr]) -> int:
    """Longest run of weight loads issued before any instruction reads one of their results
    (the loads one warp has in flight at once)."""
    best, run, pending = 0, 0, set()
    for ins in body:
        if is_weight_load(ins):
            if pending & _src_regs(ins):
                run, pending = 0, set()
            run += 1
            pending |= _dest_regs(ins)
            best = max(best, run)
        elif run and pending & _src_regs(ins):
            run, pending = 0, set()
    return best


@dataclass
class FunctionReport:
    name: str
    n_local: int                  # LDL + STL anywhere
    local_store_bytes: int
    local_load_bytes: int
    weight_loops: int             # innermost loops whose body has a weight load
    weight_loads: int             # weight loads in their bodies (per iteration, static count)
    back_to_back: int             # max over those loops
    bad_loops: list[Loop]         # innermost weight loops with LDL/STL in the body: the failure
    outer_local: int = 0          # LDL/STL in loops enclosing a weight loop, outside the weight loop


def analyze(name: str, instrs: list[Instr]) -> FunctionReport:
    local = [x for x in instrs if is_local(x)]
    wl = [lp for lp in loops(instrs) if any(is_weight_load(x) for x in lp.body)]
    # the weight loop proper is innermost: no other weight loop lies inside it. An enclosing loop
    # (over output tiles, say) may reload a spilled value once per tile; that is reported, not failed.
    spans = {(lp.start, lp.end): lp for lp in wl}
    inner = [lp for key, lp in spans.items()
             if not any(o != key and key[0] <= o[0] and o[1] <= key[1] for o in spans)]
    loads = sum(is_weight_load(x) for lp in inner for x in lp.body)
    b2b = max((back_to_back(lp.body) for lp in inner), default=0)
    inner_spans = {(lp.start, lp.end) for lp in inner}
    outer_local = {x.addr for key, lp in spans.items() if key not in inner_spans for x in lp.body
                   if is_local(x) and not any(a <= x.addr <= b for a, b in inner_spans)}
    return FunctionReport(
        name=name, n_local=len(local),
        local_store_bytes=sum(local_bytes(x) for x in local if x.op == "STL"),
        local_load_bytes=sum(local_bytes(x) for x in local if x.op == "LDL"),
        weight_loops=len(inner), weight_loads=loads, back_to_back=b2b,
        bad_loops=[lp for lp in inner if any(is_local(x) for x in lp.body)],
        outer_local=len(outer_local))


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names via c++filt when present (else unchanged)."""
    try:
        res = subprocess.run(["c++filt"], input="\n".join(n.split("#")[0] for n in names), capture_output=True,
                             text=True, check=True).stdout.splitlines()
        if len(res) == len(names):
            return {n: r + (("#" + n.split("#")[1]) if "#" in n else "") for n, r in zip(names, res)}
    except Exception:
        pass
    return {n: n for n in names}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def weight_loop_problems(reports: list[FunctionReport], names: dict[str, str] | None = None) -> list[str]:
    """One message per weight loop that touches local memory (LDL/STL in the loop body)."""
    msgs = []
    for r in reports:
        for lp in r.bad_loops:
            bad = "; ".join(f"/*{x.addr:04x}*/ {x.text()}" for x in lp.body if is_local(x))
            msgs.append(f"{(names or {}).get(r.name, r.name)}: weight loop [{lp.start:#x}, {lp.end:#x}] has "
                        f"local-memory traffic: {bad}")
    return msgs
