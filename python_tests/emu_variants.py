"""Variants of the emulated CUDA module (and of the native CPU module, `build_cpu_variant`) with planted
bugs (mutants), built in seconds.

`build_variant(tmp, edits, recompile)` copies csrc/ to `tmp`, applies `edits`
({path under csrc/: [(old, new), ...]}, each `old` must occur exactly once),
recompiles the named launcher files (csrc/<stem>.cu) with the exact commands
CMake used for d3kernels._C_emu (compile_commands.json in build/), links them
with the installed build's other objects, and imports the result as a module.

A mutation must only change code that the recompiled files instantiate (e.g.
gemv_kernel<LmHeadOp, ...> lives in lm_head.cu alone), so the linked objects
cannot mix mutated and original copies of one function.
"""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
_COUNT = 0


def _commands(path) -> list:
    """compile_commands.json's entries, each with an absolute "output" (older CMake leaves the field out: it is
    then the command's -o argument)."""
    entries = json.load(open(path))
    for e in entries:
        out = e.get("output") or shlex.split(e["command"])[shlex.split(e["command"]).index("-o") + 1]
        e["output"] = os.path.join(e["directory"], out)
    return entries


def emu_build_dir():
    """The CMake build directory of the installed _C_emu (newest first), or None."""
    best = None
    for path in glob.glob(str(ROOT / "build" / "cmake-*" / "compile_commands.json")):
        entries = _commands(path)
        if any(e["output"].endswith("_C_emu.dir/csrc/emu/simt.cpp.o") and os.path.exists(e["output"])
               for e in entries):
            if best is None or os.path.getmtime(path) > os.path.getmtime(best):
                best = path
    return None if best is None else Path(best).parent


def why_not() -> str | None:
    """None if variants can be built here, else why not."""
    if emu_build_dir() is None:
        return ("no CMake build of d3kernels._C_emu with compile_commands.json under build/ "
                "(install from source: pip install -e .)")
    return None


def _run(cmd: list, cwd: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{r.stderr[-4000:]}")


def _edited_copy(src: Path, edits: dict) -> Path:
    """csrc/ copied to src with edits ({path under csrc/: [(old, new), ...]}, each old occurring once)."""
    shutil.copytree(CSRC, src)
    for rel, subs in edits.items():
        f = src / rel
        text = f.read_text()
        for old, new in subs:
            n = text.count(old)
            if n != 1:
                raise ValueError(f"{rel}: the text to replace occurs {n} times, expected once: {old!r}")
            text = text.replace(old, new)
        f.write_text(text)
    return src


def build_variant(tmp: Path, edits: dict, recompile: list, name: str = "variant"):
    """Build and import a _C_emu variant; returns the module."""
    build = emu_build_dir()
    if build is None:
        raise RuntimeError(why_not())
    src = _edited_copy(Path(tmp) / name / "csrc", edits)

    entries = [e for e in _commands(build / "compile_commands.json") if "/_C_emu.dir/" in e["output"]]
    objects = {Path(e["file"]).stem if "/emu/" in e["file"] and "/csrc/" not in e["file"] else Path(e["file"]).name:
               e for e in entries}
    out_dir = src.parent
    link = []
    for key, e in objects.items():
        if key not in recompile:
            link.append(e["output"])
            continue
        cmd = shlex.split(e["command"])
        cmd = [a.replace(str(CSRC / "emu" / "include"), str(src / "emu" / "include"))
                .replace(str(CSRC / "include"), str(src / "include")) for a in cmd]
        obj = out_dir / f"{key}.o"
        cmd[cmd.index("-o") + 1] = str(obj)
        cmd[cmd.index("-c") + 1:cmd.index("-c") + 2] = ["-x", "c++", str(src / f"{key}.cu")]
        _run(cmd, e["directory"])
        link.append(str(obj))
    missing = set(recompile) - set(objects)
    if missing:
        raise ValueError(f"no emulated translation unit for {sorted(missing)}")
    cxx = shlex.split(entries[0]["command"])[0]
    return _link_and_import(cxx, link, out_dir, "_C_emu", [])


def _link_and_import(cxx: str, objects: list, out_dir: Path, name: str, flags: list):
    """Link objects into the extension `name` in out_dir and import it under a unique package part:
    pybind11 caches modules by their full name (the init function is still PyInit_<name>)."""
    so = out_dir / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    _run([cxx, "-shared", *flags, "-o", str(so), *objects], str(out_dir))
    global _COUNT
    _COUNT += 1
    spec = importlib.util.spec_from_file_location(f"d3k_variant{_COUNT}.{name}", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_build_dir():
    """The CMake build directory of the installed _C_cpu (newest first), or None."""
    best = None
    for path in glob.glob(str(ROOT / "build" / "cmake-*" / "compile_commands.json")):
        entries = _commands(path)
        if any("/_C_cpu.dir/" in e["output"] and os.path.exists(e["output"]) for e in entries):
            if best is None or os.path.getmtime(path) > os.path.getmtime(best):
                best = path
    return None if best is None else Path(best).parent


def build_cpu_variant(tmp: Path, edits: dict, recompile: list, name: str = "cpu_variant"):
    """Build and import a _C_cpu variant: csrc/ copied to tmp with `edits` ({path under csrc/: [(old, new)]}),
    the files `recompile` (names under csrc/cpu/, e.g. "isa_scalar.cpp") compiled with CMake's commands and
    linked with the installed build's other objects. Returns the module."""
    build = cpu_build_dir()
    if build is None:
        raise RuntimeError("no CMake build of d3kernels._C_cpu with compile_commands.json under build/")
    src = _edited_copy(Path(tmp) / name / "csrc", edits)
    entries = [e for e in _commands(build / "compile_commands.json") if "/_C_cpu.dir/" in e["output"]]
    link = []
    for e in entries:
        key = Path(e["file"]).name
        if key not in recompile:
            link.append(e["output"])
            continue
        cmd = [a.replace(str(CSRC / "include"), str(src / "include")) for a in shlex.split(e["command"])]
        obj = src.parent / f"{key}.o"
        cmd[cmd.index("-o") + 1] = str(obj)
        cmd[cmd.index("-c") + 1] = str(src / "cpu" / key)
        _run(cmd, e["directory"])
        link.append(str(obj))
    return _link_and_import(shlex.split(entries[0]["command"])[0], link, src.parent, "_C_cpu", ["-fopenmp"])
