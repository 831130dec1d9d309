"""The emulated CUDA build's checks can fail: each test plants one bug in a copy of csrc/ (a mutant),
builds it (python_tests/emu_variants.py), and runs the same check test_cuda_ops.py applies to the real
kernels. The check passes on the installed _C_emu and must fail on the mutant, for the stated reason:

- race check: a __syncthreads() removed -> results differ across seeds (or read poisoned shared memory);
- bounds check: an index one past a row's end, reading or writing -> the guard page faults and the launch
  fails with "out-of-bounds access ... past the end of a guarded buffer";
- barrier check: a __syncthreads() some threads skip -> the launch fails naming the divergence.

Plus the emulation's own behaviour: a seed changes the orders (so three seeds are three schedules), and
an emulated launch error leaves the module usable.
"""
import re

import pytest
import torch

import emu_variants
from test_cuda_ops import (ATTN, HEAD, SAMPLE, Target, _attn_args, _check_attn, _run3, _same, assert_close,
                           poison, run_kernel)

from d3kernels import _ops, guarded

pytestmark = pytest.mark.skipif(not _ops.cuda_emu_ops.available or emu_variants.why_not() is not None,
                                reason=f"needs the emulated build and its objects: {_ops.C_EMU_ERROR or emu_variants.why_not()}")


# ------------------------------------------------------------------ the checks (as in test_cuda_ops.py)
def check_lm_head(t: Target):
    B, d, V = HEAD["small_vec"]
    g = torch.Generator().manual_seed(2)
    args = [poison(torch.empty(B, V)), torch.randn(B, d, generator=g).bfloat16(),
            (1 + 0.1 * torch.randn(d, generator=g)).bfloat16(),
            (torch.randn(V, d, generator=g) * 3 * d ** -0.5).bfloat16(), 1e-5]
    ours, same, o64 = _run3(t, "lm_head", args)
    assert_close("logits", ours[0], same[0], o64[0], torch.bfloat16)


def check_attn_block(t: Target):
    c = ATTN["small_gqa_splits"]
    ours, same, o64 = _run3(t, "attn_block", _attn_args(t, c, torch.bfloat16))
    _check_attn(c, torch.bfloat16, ours, same, o64)


def check_sample(t: Target):
    B, V, ld = SAMPLE["small_odd"]
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(4))
    tokens = poison(torch.empty(B, dtype=torch.int64))
    ours = run_kernel(t, "sample", [tokens, logits])
    _same("tokens", ours[0], logits.argmax(dim=-1))


def failure(check, module) -> str | None:
    """None if `check` passes on `module`'s kernels, else its failure message."""
    t = Target("emu", ops=_ops.CudaKernels(module, "cpu", "cuda-emu", None))
    try:
        check(t)
    except (AssertionError, RuntimeError) as e:
        return str(e)
    return None


GEMV = "include/d3k/gemv_kernel.cuh"
ATTN_H = "include/d3k/attn.cuh"
HEAD_H = "include/d3k/head.cuh"

# name: (edits, files to recompile, check, the failure it must produce)
MUTANTS = {
    "race: gemv reads x before every thread staged it": (
        {GEMV: [("    Op::template stage<T, BMAX, VEC>(p, xs, k0, kl, mask, ss);\n    __syncthreads();\n",
                 "    Op::template stage<T, BMAX, VEC>(p, xs, k0, kl, mask, ss);\n")]},
        ["lm_head"], check_lm_head, r"seed \d vs seed \d|NaN"),
    "race: attention merges warps before they stored their state": (
        {ATTN_H: [("  __syncthreads();\n\n  const int64_t HD", "\n  const int64_t HD")]},
        ["attn_decode"], check_attn_block, r"seed \d vs seed \d|NaN|error"),
    "bounds: argmax reads one past the row": (
        {HEAD_H: [("for (int i = threadIdx.x; i < V; i += kThreads) {", "for (int i = threadIdx.x; i <= V; i += kThreads) {")]},
        ["sample"], check_sample, r"out-of-bounds access.*bytes past the end of a guarded buffer"),
    "bounds: o_proj writes one past the row": (
        {ATTN_H: [("out[b * p.ld_out + row] = v;", "out[b * p.ld_out + row + 1] = v;")]},
        ["o_proj"], check_attn_block, r"out-of-bounds access.*bytes past the end of a guarded buffer"),
    "barrier: argmax's __syncthreads() reached by warp 0 only": (
        {HEAD_H: [("  __syncthreads();\n  if (warp == 0) {", "  if (warp == 0) __syncthreads();\n  if (warp == 0) {")]},
        ["sample"], check_sample, r"__syncthreads\(\) reached by 32 threads while 992 threads of the block have exited"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name, tmp_path):
    edits, recompile, check, expect = MUTANTS[name]
    assert failure(check, _ops.C_EMU) is None, "the check must pass on the real kernels"
    mutant = emu_variants.build_variant(tmp_path, edits, recompile, name="mutant")
    msg = failure(check, mutant)
    assert msg is not None, f"mutant not caught: {name}"
    assert re.search(expect, msg, re.S), f"caught for another reason than expected ({expect}): {msg[:600]}"


def test_unmutated_variant_matches_the_installed_build(tmp_path):
    """The variant build itself is sound: rebuilt from an unchanged copy, the kernels give the same bits."""
    variant = emu_variants.build_variant(tmp_path, {}, ["lm_head", "attn_decode"], name="same")
    assert failure(check_lm_head, variant) is None
    assert failure(check_attn_block, variant) is None


def test_seeds_change_the_schedule():
    """A seed fixes the block order and the thread order at every barrier: the same seed repeats the schedule
    exactly, another seed gives another one (same work, same number of switches)."""
    C = _ops.C_EMU
    t = Target("emu")
    B, d, V = HEAD["small_vec"]
    logits, h = torch.empty(B, V), torch.randn(B, d).half()
    norm, w = torch.ones(d).half(), torch.randn(V, d).half()
    runs = []
    for seed in (1, 2, 3, 2):
        C.set_seed(seed)
        before = C.emu_stats()["switches"]
        t.ops.lm_head(logits, h, norm, w, 1e-5)
        after = C.emu_stats()
        runs.append((after["schedule"], after["switches"] - before))
    assert len({r[1] for r in runs}) == 1 and runs[0][1] > 0
    assert len({r[0] for r in runs[:3]}) == 3, "three seeds must give three schedules"
    assert runs[3][0] == runs[1][0], "the same seed must repeat its schedule"


def test_launch_error_leaves_the_module_usable():
    """After an out-of-bounds launch (an error string, no crash), the next launch runs normally."""
    C = _ops.C_EMU
    logits = guarded.empty((2, 1000), torch.float32).normal_()
    tokens = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="out-of-bounds access"):
        C.argmax(tokens.data_ptr(), logits.data_ptr(), 2, 1001, 1001, 0, 0)   # V past the buffer
    C.argmax(tokens.data_ptr(), logits.data_ptr(), 2, 1000, 1000, 0, 0)
    _same("tokens", tokens, logits.argmax(-1))
