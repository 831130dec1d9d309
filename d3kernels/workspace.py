"""Scratch memory of the GPU backends, one workspace per decoding state (docs/design.md section 3.7).

The CUDA and Triton kernels need small float32 scratch (q, split-K partials, the MLP activation). A
`Workspace` holds it: buffers are made on the first call per (tag, shape, device, dtype) and reused, so
later calls and a CUDA graph captured after the first allocate nothing. Ops take the workspace that is
active in the calling context (`with ws:`); each StepCore runs its steps in its own, so two decoders on two
streams never share a buffer. Outside any `with`, ops use one process-wide default workspace (a user
calling the ops directly): keep such calls on one stream at a time.
"""
from __future__ import annotations

import contextvars

import torch


class Workspace:
    """Named scratch buffers, made on first use and kept."""

    def __init__(self):
        self.buffers: dict = {}
        self._tokens = []

    def get(self, key: tuple, make) -> object:
        """The buffer under key, made by make() the first time."""
        t = self.buffers.get(key)
        if t is None:
            t = self.buffers[key] = make()
        return t

    def tensor(self, tag: str, shape: tuple, device, dtype: torch.dtype = torch.float32,
               zero: bool = False) -> torch.Tensor:
        """A scratch tensor per (tag, shape, device, dtype); zero=True: zeroed when made (counters)."""
        alloc = torch.zeros if zero else torch.empty
        return self.get((tag, tuple(shape), str(device), dtype), lambda: alloc(shape, device=device, dtype=dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values() if isinstance(t, torch.Tensor))

    def clear(self) -> None:
        self.buffers.clear()

    def __enter__(self) -> "Workspace":
        self._tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())


DEFAULT = Workspace()
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("d3kernels_workspace", default=DEFAULT)


def active() -> Workspace:
    """The workspace of the calling context: the innermost `with ws:`, else DEFAULT."""
    return _ACTIVE.get()
