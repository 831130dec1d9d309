"""The correctness rule of docs/design.md section 6 (d3kernels/tolerance.py), as test assertions."""
import torch

from d3kernels.tolerance import SLACK, compare, poison  # noqa: F401  (poison, SLACK: used by the tests)


def assert_close(name: str, out: torch.Tensor, same_precision: torch.Tensor, oracle64: torch.Tensor,
                 dtype: torch.dtype) -> None:
    """out: the backend's result; same_precision: the reference at the same dtype; oracle64: float64."""
    problem, _, _ = compare(out, same_precision, oracle64, dtype)
    assert problem is None, f"{name}: {problem}"
