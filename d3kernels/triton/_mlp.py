"""mlp_block as two kernels: (1) RMSNorm + gate/up GEMV + silu(g) * u into an fp32 scratch [B, F];
(2) down GEMV + residual (inactive rows: out = h)."""
from __future__ import annotations

from ._common import check_contiguous, check_dtype, launch_gemv_residual, launch_norm_gemv, scratch


def mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active, eps) -> None:
    """See d3kernels.reference.mlp_block. out [B, d] written (may alias h)."""
    B, d = h.shape
    F = w_down.shape[1]
    check_dtype(h.dtype)
    check_contiguous(out=out, h=h, mlp_norm=mlp_norm, w_gate_up=w_gate_up, w_down=w_down, row_active=row_active)
    a = scratch("mlp.act", (B, F), h.device)
    launch_norm_gemv(a, h, mlp_norm, w_gate_up, F, eps, gated=True)
    launch_gemv_residual(out, h, a, w_down, row_active)
