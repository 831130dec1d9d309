"""The correctness rule of docs/design.md section 6, in one place.

A backend's output is compared with a float64 computation of the same math
(the reference ops run on float64 tensors). It may be at most 2x as far off as
the reference run at the backend's own precision, plus a slack of 1e-5 (fp32)
or 2e-3 (fp16/bf16) times the output's largest magnitude. NaN never passes.
"""
import torch

SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def assert_close(name: str, out: torch.Tensor, same_precision: torch.Tensor, oracle64: torch.Tensor,
                 dtype: torch.dtype) -> None:
    """out: the backend's result; same_precision: the reference at the same dtype; oracle64: float64."""
    out, same_precision, oracle64 = out.double().cpu(), same_precision.double().cpu(), oracle64.double().cpu()
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert not torch.isnan(oracle64).any(), f"{name}: NaN in the float64 oracle"
    err = (out - oracle64).abs().max().item()
    base = (same_precision - oracle64).abs().max().item()
    bound = 2 * base + SLACK[dtype] * oracle64.abs().max().item()
    assert err <= bound, f"{name}: max abs error {err:.3e} > bound {bound:.3e} (reference error {base:.3e})"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or a sentinel (ints), so unwritten elements fail the comparison."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(123)
