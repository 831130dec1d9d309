"""The KV cache and its depth mask (DESIGN.md section 2).

K and V are [L, B, H_kv, S, D] in the model dtype, so layer l is one contiguous
[B, H_kv, S, D] view. kv_valid [L, B, S] uint8 is 1 where layer l holds a real
K/V entry for (row b, position p). Allocated once; a request that does not fit
is rejected before it runs.
"""
from __future__ import annotations

import torch

from .model import ModelConfig


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


class KVCache:
    """Static K/V storage plus the kv_valid depth mask.

    Attributes: k, v [L, B, H_kv, S, D]; kv_valid [L, B, S] uint8.
    """

    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq_len: int, device, dtype: torch.dtype,
                 log=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.shape = (cfg.num_layers, max_batch, cfg.kv_heads, max_seq_len, cfg.head_dim)
        self.nbytes = self.bytes_needed(cfg, max_batch, max_seq_len, dtype)
        if log is not None:
            log(f"KV cache: 2 x {list(self.shape)} {str(dtype).replace('torch.', '')} + mask = "
                f"{_fmt_bytes(self.nbytes)} on {device}")
        self.k = torch.zeros(self.shape, device=device, dtype=dtype)
        self.v = torch.zeros(self.shape, device=device, dtype=dtype)
        self.kv_valid = torch.zeros(self.shape[:2] + (max_seq_len,), device=device, dtype=torch.uint8)

    @staticmethod
    def bytes_needed(cfg: ModelConfig, max_batch: int, max_seq_len: int, dtype: torch.dtype) -> int:
        """Bytes the cache will take: K + V + kv_valid."""
        n = cfg.num_layers * max_batch * max_seq_len
        return 2 * n * cfg.kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size() + n

    @property
    def max_batch(self) -> int:
        return self.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.shape[3]

    def reset(self) -> None:
        """Forget every entry (K/V bytes stay; only the mask matters)."""
        self.kv_valid.zero_()
