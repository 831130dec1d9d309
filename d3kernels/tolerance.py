"""The correctness rule of docs/design.md section 6, in one place (the tests and `d3kernels selftest`).

A backend's output is compared with a float64 computation of the same math (the reference ops on float64
tensors). It may be at most 2x as far off as the reference run at the backend's own precision, plus a
slack of 1e-5 (fp32) or 2e-3 (fp16/bf16) times the output's largest magnitude. NaN never passes.
The cpu backend with block-quantized weights rounds its float32 activations to 16-bit integer blocks of 32
(two int8 planes, d3kernels.cpu) before the dot products: its slack is PACKED_SLACK (1e-4), the rounding's own
size (1/65024 of a block's largest value per value) with room for the sums over d and F terms. The integer
math itself is held to a tighter rule: the kernels' dot products equal an exact float64 emulation of the same
rounding within 1e-5 (python_tests/test_cpu_backend.py, test_block_dot_equals_rounding_emulation).
"""
from __future__ import annotations

import torch

SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
PACKED_SLACK = 1e-4


def compare(out: torch.Tensor, same_precision: torch.Tensor, oracle64: torch.Tensor, dtype: torch.dtype,
            nan_where_oracle: bool = False, slack: float | None = None) -> tuple:
    """(problem or None, max abs error, bound). out: the backend's result; same_precision: the reference at
    `dtype`; oracle64: the reference in float64; slack: a larger slack (PACKED_SLACK). nan_where_oracle: the oracle may hold NaN (a poisoned cache
    entry nobody writes), and `out` must hold NaN at exactly those places; elsewhere NaN fails."""
    out, same, oracle = (t.detach().double().cpu() for t in (out, same_precision, oracle64))
    if nan_where_oracle:
        keep = ~torch.isnan(oracle)
        if not torch.equal(torch.isnan(out), ~keep):
            return "NaN where the reference has a number, or a number where nothing may be written", float("nan"), 0.0
        out, same, oracle = out[keep], same[keep], oracle[keep]
    if torch.isnan(out).any():
        return "NaN in output", float("nan"), 0.0
    if torch.isnan(oracle).any():
        return "NaN in the float64 oracle", float("nan"), 0.0
    if out.numel() == 0:
        return None, 0.0, 0.0
    err = (out - oracle).abs().max().item()
    base = (same - oracle).abs().max().item()
    bound = 2 * base + max(SLACK[dtype], slack or 0.0) * oracle.abs().max().item()
    if err > bound:
        return f"max abs error {err:.3e} > bound {bound:.3e} (reference error {base:.3e})", err, bound
    return None, err, bound


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or a sentinel (ints), so unwritten elements fail the comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(123)
