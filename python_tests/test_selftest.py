"""`d3kernels selftest` and auto's use of its records, with the emulated CUDA build standing in for a GPU:
a passing record makes auto choose the backend, a record of another build or device does not count, the
first use runs the selftest once, and a planted mutant of the emulated build fails it and stays off. The
native cpu backend's selftest (auto's CPU candidate) likewise: it passes and records in every activation
dtype, and a planted fault fails it and keeps auto on the reference. Every test keeps its records in a
fresh cache directory."""
import functools
import json

import pytest
import torch

import emu_variants
from d3kernels import _ops, backends, selftest, verify
from d3kernels.cli import main

needs_emu = pytest.mark.skipif(not _ops.cuda_emu_ops.available,
                               reason=f"needs the emulated CUDA build: {_ops.C_EMU_ERROR}")
needs_cpu = pytest.mark.skipif(backends.why_not("cpu", "cpu", torch.float32) is not None,
                               reason=f"needs the native cpu backend: {backends.why_not('cpu', 'cpu', torch.float32)}")
QUICK = dict(shapes=["small"], dtypes=(torch.bfloat16,))


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """cuda-emu as auto's candidate on the CPU, records in a fresh cache, the first-use selftest quick and
    counted."""
    monkeypatch.setenv("D3K_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("D3K_SELFTEST", raising=False)
    monkeypatch.delenv("D3K_BACKEND", raising=False)
    monkeypatch.setitem(backends.AUTO_CANDIDATES, "cpu", ("cuda-emu",))
    calls = []
    real = selftest.run

    def quick_run(*args, **kw):
        calls.append(args)
        return real(*args, **{**kw, **QUICK})
    monkeypatch.setattr(selftest, "run", quick_run)
    return calls


def auto():
    return backends.resolve("auto", "cpu", torch.bfloat16, 64)


@needs_emu
def test_selftest_passes_and_records(standin, tmp_path):
    rec = selftest.run("cuda-emu", "cpu", log=None)
    assert rec["passed"] and len(rec["cases"]) >= 30
    names = " ".join(c["case"] for c in rec["cases"])
    for op in ("attn_block out", "attn_block_paged out", "mlp_block", "write_kv mask", "write_kv project",
               "write_kv copy", "write_kv_paged project", "lm_head", "sample greedy", "sample t=0.7", "decode step 8"):
        assert op in names, op
    saved = verify.status("cuda-emu", "cpu")
    assert saved is not None and saved["passed"] and saved["path"].startswith(str(tmp_path))
    for key in ("device", "build_id", "package", "torch", "triton", "date", "cases"):
        assert key in saved, key


@needs_emu
def test_auto_uses_a_passing_record_and_only_its_own(standin, monkeypatch):
    monkeypatch.setenv("D3K_SELFTEST", "0")               # no first-use run: without a record, auto skips it
    assert auto() == "reference"
    rec = selftest.run("cuda-emu", "cpu", log=None)
    assert auto() == "cuda-emu"
    path = rec["path"]
    with open(path) as f:                               # the same file, but made by another build
        data = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(data, build_id="0123456789abcdef"), f)
    assert verify.status("cuda-emu", "cpu") is None and auto() == "reference"
    with open(path, "w") as f:
        json.dump(data, f)
    assert auto() == "cuda-emu"
    other = dict(verify.device_key("cpu"), name="another CPU")
    monkeypatch.setattr(verify, "device_key", lambda device: other)     # this record's device is not this one
    assert auto() == "reference"


@needs_emu
def test_first_use_runs_the_selftest_once(standin, capsys):
    assert auto() == "cuda-emu"
    assert auto() == "cuda-emu"
    assert len(standin) == 1, "the selftest ran more than once"
    err = capsys.readouterr().err
    assert err.count("verifying the cuda-emu backend") == 1 and "D3K_SELFTEST=0" in err


@needs_emu
def test_selftest_off_keeps_the_backend_off(standin, monkeypatch):
    monkeypatch.setenv("D3K_SELFTEST", "0")
    assert auto() == "reference" and standin == [] and verify.status("cuda-emu", "cpu") is None


@needs_emu
@pytest.mark.skipif(emu_variants.why_not() is not None, reason=f"{emu_variants.why_not()}")
def test_a_planted_mutant_fails_and_stays_off(standin, monkeypatch, tmp_path, capsys):
    """RoPE's sine negated in the "project" KV writer only: the selftest's write_kv cases catch it."""
    mutant = emu_variants.build_variant(tmp_path, {"include/d3k/kv.cuh": [
        ("p.rope_sin[ps * p.rope_ld + j], r0, r1)", "-p.rope_sin[ps * p.rope_ld + j], r0, r1)")]},
        ["kv_project"], name="mutant")
    monkeypatch.setattr(_ops, "cuda_emu_ops", _ops.CudaKernels(mutant, "cpu", "cuda-emu", None))
    assert auto() == "reference"
    err = capsys.readouterr().err
    assert "FAILED its selftest" in err and "write_kv project" in err and "write_kv mask" not in err
    assert "issue tracker" in err
    rec = verify.status("cuda-emu", "cpu")
    assert rec is not None and not rec["passed"]
    failed = {c["case"] for c in rec["cases"] if not c["passed"]}
    assert failed and all("project" in c for c in failed), failed
    assert auto() == "reference" and len(standin) == 1, "a failed record keeps it off without rerunning"


@needs_emu
def test_cli_selftest_and_info(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("D3K_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(selftest, "run", functools.partial(selftest.run, **QUICK))
    assert main(["selftest", "--backend", "cuda-emu"]) == 0
    assert "PASS" in capsys.readouterr().err
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "selftest records" in out and "cuda-emu" in out and "PASS" in out


# --------------------------------------------------------------------------- the native cpu backend
@pytest.fixture
def cpu_cache(monkeypatch, tmp_path):
    """Records in a fresh cache, auto free to run the first-use selftest (small shape only), the runs
    counted."""
    monkeypatch.setenv("D3K_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("D3K_SELFTEST", raising=False)
    monkeypatch.delenv("D3K_BACKEND", raising=False)
    calls = []
    real = selftest.run

    def quick_run(*args, **kw):
        calls.append(args)
        return real(*args, **{**kw, "shapes": ["small"]})
    monkeypatch.setattr(selftest, "run", quick_run)
    return calls


@needs_cpu
def test_cpu_selftest_passes_and_records(cpu_cache, tmp_path):
    """The cpu selftest runs every op and the decode steps in float32, bfloat16 and float16, passes, and
    saves its record in this cache; auto then picks the cpu backend without running it again."""
    assert verify.status("cpu", "cpu") is None
    rec = selftest.run("cpu", log=None)
    assert rec["passed"], [c for c in rec["cases"] if not c["passed"]]
    names = [c["case"] for c in rec["cases"]]
    for dt in ("float32", "bfloat16", "float16"):
        for op in ("small attn_block out", "small attn_block_paged out", "small mlp_block", "small write_kv mask",
                   "small write_kv project", "small write_kv copy", "small write_kv_paged copy", "small lm_head",
                   "small sample greedy", "decode step 8"):
            assert any(n.startswith(f"{dt} {op}") for n in names), f"{dt} {op}"
    saved = verify.status("cpu", "cpu")
    assert saved is not None and saved["passed"] and saved["path"].startswith(str(tmp_path))
    assert saved["build_id"] == verify.build_id("cpu") != "not-built"
    assert backends.resolve("auto", "cpu", torch.float32, 64) == "cpu" and len(cpu_cache) == 1


@needs_cpu
def test_cpu_selftest_catches_a_planted_fault(cpu_cache, monkeypatch, capsys):
    """mlp_block's output 1% too large in float16 only (the selftest runs float16 alone here): the first
    use's selftest fails on that case, records the failure, and auto keeps the reference (without running
    the selftest again)."""
    from d3kernels import cpu
    monkeypatch.setattr(selftest, "run", functools.partial(selftest.run, dtypes=(torch.float16,)))
    real = cpu.ops.mlp_block

    def mlp_block(out, h, *args):
        real(out, h, *args)
        if out.dtype == torch.float16:
            out.mul_(1.01)
    monkeypatch.setattr(cpu.ops, "mlp_block", mlp_block)
    assert backends.resolve("auto", "cpu", torch.float32, 64) == "reference"
    err = capsys.readouterr().err
    assert "verifying the cpu backend" in err and "FAILED its selftest" in err
    rec = verify.status("cpu", "cpu")
    assert rec is not None and not rec["passed"]
    failed = {c["case"] for c in rec["cases"] if not c["passed"]}
    assert "float16 small mlp_block out" in failed and "float16 small attn_block out" not in failed, failed
    assert backends.resolve("auto", "cpu", torch.float16, 64) == "reference" and len(cpu_cache) == 1
