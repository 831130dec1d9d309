"""The correctness rule of docs/design.md section 6, in one place (the tests and `d3kernels selftest`).

A backend's output is compared with a float64 computation of the same math (the reference ops on float64
tensors). Its max abs error may be at most 2x that of the reference run at the backend's own precision,
plus a slack of 1e-5 (fp32) or 2e-4 (fp16/bf16) times the output's largest magnitude. NaN never passes.

In fp16 / bf16 the max error is that of rounding the largest outputs, so it hides an error confined to a
smaller part of the output: a 2% scale error in wo (the attention half's residual branch) passed the max
rule in bf16. So 16-bit outputs must also keep their mean abs error within MEAN_FACTOR (1.5) x the
reference's plus MEAN_SLACK (1e-4) x the mean magnitude: rounding errors average out, a systematic one
does not. What correct kernels need: on every case of `d3kernels selftest` (cuda-emu, which runs the CUDA
kernels' code, and cpu; both 16-bit dtypes, ops and decode steps) their max error was at most 1.11x and
their mean error at most 1.08x the reference's; the slacks cover outputs the reference gets almost exactly
(float32 logits from 16-bit inputs: float32 summation order, about 1e-6 of the largest logit, or 2^-16 of
it for Triton's split products). A 2% scale error in any one weight of attn_block, mlp_block or lm_head
fails in bf16 (python_tests/test_tolerance.py).

The cpu backend with block-quantized weights rounds its float32 activations to int16 per block of 32
(d3kernels.cpu) before the dot products: its slack is PACKED_SLACK (1e-4), the rounding's own
size (1/65024 of a block's largest value per value) with room for the sums over d and F terms. The integer
math itself is held to a tighter rule: the kernels' dot products equal an exact float64 emulation of the same
rounding within 1e-5 (python_tests/test_cpu_backend.py, test_block_dot_equals_rounding_emulation).
"""
from __future__ import annotations

import torch

SLACK = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-4}
MEAN_FACTOR, MEAN_SLACK = 1.5, 1e-4      # the mean rule of 16-bit outputs
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
    if dtype in (torch.float16, torch.bfloat16):
        mean, mean_base = (out - oracle).abs().mean().item(), (same - oracle).abs().mean().item()
        mean_bound = MEAN_FACTOR * mean_base + max(MEAN_SLACK, slack or 0.0) * oracle.abs().mean().item()
        if mean > mean_bound:
            return (f"mean abs error {mean:.3e} > bound {mean_bound:.3e} (reference mean error {mean_base:.3e}): "
                    "a systematic error"), err, bound
    return None, err, bound


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or a sentinel (ints), so unwritten elements fail the comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(123)
