"""`d3kernels selftest` and auto's use of its records, with the emulated CUDA build standing in for a GPU:
a passing record makes auto choose the backend, a record of another build or device does not count, the
first use runs the selftest once, and a planted mutant of the emulated build fails it and stays off."""
import functools
import json

import pytest
import torch

import emu_variants
from d3kernels import _ops, backends, selftest, verify
from d3kernels.cli import main

pytestmark = pytest.mark.skipif(not _ops.cuda_emu_ops.available,
                                reason=f"needs the emulated CUDA build: {_ops.C_EMU_ERROR}")
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


def test_first_use_runs_the_selftest_once(standin, capsys):
    assert auto() == "cuda-emu"
    assert auto() == "cuda-emu"
    assert len(standin) == 1, "the selftest ran more than once"
    err = capsys.readouterr().err
    assert err.count("verifying the cuda-emu backend") == 1 and "D3K_SELFTEST=0" in err


def test_selftest_off_keeps_the_backend_off(standin, monkeypatch):
    monkeypatch.setenv("D3K_SELFTEST", "0")
    assert auto() == "reference" and standin == [] and verify.status("cuda-emu", "cpu") is None


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


def test_cli_selftest_and_info(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("D3K_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(selftest, "run", functools.partial(selftest.run, **QUICK))
    assert main(["selftest", "--backend", "cuda-emu"]) == 0
    assert "PASS" in capsys.readouterr().err
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "selftest records" in out and "cuda-emu" in out and "PASS" in out
