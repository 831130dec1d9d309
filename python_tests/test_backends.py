"""Backend selection (docs/design.md section 3): auto order, CPU rules, named backends that cannot run."""
import os

import pytest
import torch

from d3kernels import backends


def test_auto_on_cpu_is_the_cpu_backend_when_built(monkeypatch, tmp_path):
    """In a fresh cache (no record of an earlier run), auto runs the cpu selftest once (small shape here),
    and picks the cpu backend for every dtype it takes."""
    from d3kernels import selftest, verify
    monkeypatch.setenv("D3K_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("D3K_BACKEND", raising=False)
    monkeypatch.delenv("D3K_SELFTEST", raising=False)
    runs = []
    real = selftest.run
    monkeypatch.setattr(selftest, "run", lambda *a, **kw: runs.append(a) or real(*a, **{**kw, "shapes": ["small"]}))
    built = backends.why_not("cpu", "cpu", torch.float32) is None
    want = "cpu" if built else "reference"
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert backends.resolve("auto", "cpu", dt, 64) == want
    assert backends.resolve("auto", "cpu", torch.float64, 64) == "reference"     # a dtype it does not take
    assert runs == ([("cpu", "cpu")] if built else [])
    if built:
        rec = verify.status("cpu", "cpu")
        assert rec["passed"] and rec["path"].startswith(str(tmp_path))


def test_auto_on_cpu_without_the_cpu_backend_is_reference(monkeypatch):
    monkeypatch.delenv("D3K_BACKEND", raising=False)
    monkeypatch.setitem(backends.AUTO_CANDIDATES, "cpu", ())
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert backends.resolve("auto", "cpu", dt, 64) == "reference"


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("D3K_BACKEND", "reference")
    assert backends.resolve("auto", "cpu", torch.float32) == "reference"
    monkeypatch.setenv("D3K_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        backends.resolve("auto", "cpu", torch.float32)


def test_named_backends_that_cannot_run_say_why():
    with pytest.raises(RuntimeError, match="needs CUDA tensors|not built|driver"):
        backends.resolve("cuda", "cpu", torch.bfloat16, 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("metal", "cpu", torch.float32)


def test_triton_rules():
    pytest.importorskip("triton")
    if backends._triton_interpreting():
        assert "bfloat16" in backends.why_not("triton", "cpu", torch.bfloat16, 64)
        assert backends.why_not("triton", "cpu", torch.float16, 64) is None
    else:
        assert "TRITON_INTERPRET" in backends.why_not("triton", "cpu", torch.float16, 64)
    assert "head_dim 80" in backends.why_not("triton", "cuda", torch.float16, 80)


def test_cuda_limits_are_named():
    from d3kernels import _ops
    if _ops.C is None or not _ops.CUDA_OPS_AVAILABLE:
        pytest.skip(f"_C without CUDA ops: {_ops.C_ERROR}")
    assert "float32" in backends.why_not("cuda", "cuda", torch.float32, 64)
    assert "head_dim 96" in backends.why_not("cuda", "cuda", torch.bfloat16, 96)


def test_report_lists_every_backend():
    rows = backends.report("cpu", torch.float32)
    assert [r[0] for r in rows] == list(backends.ALL_BACKENDS)
    assert dict((r[0], r) for r in rows)["reference"] == ("reference", True, "ok")


def test_cuda_emu_is_named_only(monkeypatch, tmp_path):
    """auto never picks the emulated CUDA build (in a fresh cache, without a first-use selftest: the
    reference); named, it runs on CPU tensors in fp16/bf16 only."""
    monkeypatch.setenv("D3K_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("D3K_SELFTEST", "0")
    monkeypatch.delenv("D3K_BACKEND", raising=False)
    assert backends.resolve("auto", "cpu", torch.bfloat16, 64) == "reference"
    if backends.why_not("cuda-emu", "cpu", torch.bfloat16, 64) is not None:
        pytest.skip(backends.why_not("cuda-emu", "cpu", torch.bfloat16, 64))
    assert backends.resolve("cuda-emu", "cpu", torch.bfloat16, 64) == "cuda-emu"
    assert "float16, bfloat16" in backends.why_not("cuda-emu", "cpu", torch.float32)
    assert "head_dim 96" in backends.why_not("cuda-emu", "cpu", torch.float16, 96)
    with pytest.raises(RuntimeError, match="cuda-emu"):
        backends.resolve("cuda-emu", "cpu", torch.float32)


def test_info_command_lists_backends_and_the_choice(capsys):
    from d3kernels.cli import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "d3kernels 0.1.0" in out and "_C:" in out
    for name in backends.BACKENDS:
        assert f"  {name} " in out
    assert "auto -> " in out


def test_emulated_build_is_installed():
    """The emulated CUDA suite must not skip silently: the install builds d3kernels._C_emu unless told not to."""
    from d3kernels import _ops
    if os.environ.get("D3K_SKIP_EMU_BUILD", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip("D3K_SKIP_EMU_BUILD is set")
    assert _ops.cuda_emu_ops.available, _ops.C_EMU_ERROR
    assert _ops.C_EMU.build_info()["compiled_with"] == "emu"


def test_kernel_limits_come_from_the_build():
    """The capability limits live in csrc/include/d3k/limits.h: build_info() exports them, and the backend
    rules and CudaKernels read them from there (a build with other limits changes the rules)."""
    from d3kernels import _ops
    if _ops.C_EMU is None and _ops.C is None:
        pytest.skip("no CUDA build (native or emulated)")
    limits = (_ops.C or _ops.C_EMU).build_info()["limits"]
    assert limits["head_dims"] == list(_ops.CUDA_HEAD_DIMS) and limits["page_size_multiple"] >= 1
    assert [str(d).replace("torch.", "") for d in _ops.CUDA_DTYPES] == limits["dtypes"]
    if _ops.cuda_emu_ops.available:
        assert "head_dim 96" in backends.why_not("cuda-emu", "cpu", torch.bfloat16, 96)
        assert "page_size 8" in backends.why_not("cuda-emu", "cpu", torch.bfloat16, 64, page_size=8)
        assert backends.why_not("cuda-emu", "cpu", torch.bfloat16, limits["head_dims"][-1],
                                page_size=limits["page_size_multiple"]) is None
