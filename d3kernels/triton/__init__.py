"""The Triton backend: portable GPU kernels with the reference ops' exact signatures and
semantics (d3kernels/reference/ops.py). The same kernels run on CPU tensors under
TRITON_INTERPRET=1, which is how CI tests their indexing and masking without a GPU.

Ops are out-variants. The kernels never allocate: small fp32 scratch (q, split-K
partials, the MLP activation) is allocated by the Python wrappers on the first call
per shape and device, then reused, so CUDA graphs captured after a warm-up call
allocate nothing. Math is float32 throughout (see _common.py for how tl.dot keeps it).
"""
import triton  # noqa: F401  (an ImportError here tells backends.why_not that triton is missing)

from ._attn import attn_block, attn_block_paged
from ._head import lm_head
from ._kv import write_kv, write_kv_paged
from ._mlp import mlp_block
from ..reference import sample  # pure torch, no host sync, CUDA-graph safe

__all__ = ["attn_block", "mlp_block", "write_kv", "attn_block_paged", "write_kv_paged", "lm_head", "sample"]
