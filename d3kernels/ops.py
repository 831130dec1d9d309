"""Public op API: one function per op, with input checks and `backend=` selection.

All ops are out-variants (the caller allocates). Shapes follow docs/design.md
section 3: B rows, d hidden, H / H_kv heads, D head_dim, F MLP width, V vocab,
L layers, S cache length. See d3kernels/reference/ops.py for exact semantics.

The argument checks live in d3kernels.checks (FILL_MODES, check_* are
re-exported here). For a loop of your own under torch.compile or CUDA graphs,
use the torch.library ops torch.ops.d3k.* (README, "Low-level API").
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import backends, declare
from .checks import (FILL_MODES, expect, check_attn_block, check_attn_block_paged, check_lm_head,  # noqa: F401
                     check_mlp_block, check_sample, check_sampling, check_write_kv, check_write_kv_paged)


def _public(op: declare.Op):
    """The ops.<name> function of a declaration: check, pick the backend from the dispatch arguments, call."""
    dev_arg, hd_arg = op.dispatch
    names = op.names

    def fn(*args, backend: str = "auto", **kwargs) -> None:
        bound = sig.bind(*args, backend=backend, **kwargs)
        args = tuple(bound.arguments[n] for n in names)
        op.check_args(args)
        t = bound.arguments[dev_arg]
        head_dim = bound.arguments[hd_arg].shape[-1] if hd_arg else None
        page_size = bound.arguments[op.page_size_of].shape[1] if op.page_size_of else None
        impl = backends.get(backends.resolve(bound.arguments["backend"], t.device, t.dtype, head_dim, page_size))
        getattr(impl, op.name)(*args[:-1], float(args[-1]))        # every public op ends with eps
    P = inspect.Parameter
    sig = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in names] +
                            [P("backend", P.POSITIONAL_OR_KEYWORD, default="auto")])
    fn.__signature__, fn.__name__, fn.__qualname__ = sig, op.name, op.name
    fn.__doc__ = op.doc + f"\n\nArguments: {op.args}; backend: auto | reference | triton | cuda | cuda-emu."
    return fn


attn_block = _public(declare.OPS["attn_block"])
mlp_block = _public(declare.OPS["mlp_block"])
write_kv = _public(declare.OPS["write_kv"])
attn_block_paged = _public(declare.OPS["attn_block_paged"])
write_kv_paged = _public(declare.OPS["write_kv_paged"])
lm_head = _public(declare.OPS["lm_head"])


def sample(tokens: torch.Tensor, logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, generator: Optional[torch.Generator] = None, backend: str = "auto") -> None:
    """tokens[B] int64 = sampled from logits[B, V] float32 (greedy when temperature == 0); no host sync."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (B, V), got {tuple(logits.shape)}")
    expect("tokens", tokens, (logits.shape[0],), torch.int64, logits.device)
    check_sampling(temperature, top_k, top_p)
    impl = backends.get(backends.resolve(backend, logits.device, torch.float32))
    impl.sample(tokens, logits, float(temperature), int(top_k), float(top_p), generator)

