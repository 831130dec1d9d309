"""The KV cache and its depth mask (docs/design.md section 2), contiguous or paged.

KVCache: K and V are [L, B, H_kv, S, D] in the model dtype, so layer l is one
contiguous [B, H_kv, S, D] view. kv_valid [L, B, S] uint8 is 1 where layer l
holds a real K/V entry for (row b, position p). Allocated once; a request that
does not fit is rejected before it runs.

PagedKVCache: the same entries in a pool of fixed-size pages that rows take as
they grow (k, v [L, P, page_size, H_kv, D], kv_valid [L, P, page_size], a
block_table per row). Both have one interface for the driver: reserve() before
a row writes new positions, release() / truncate() / reset(), gather() /
scatter() for the prefill (which works on the contiguous layout),
state() / load_state().
"""
from __future__ import annotations

from typing import Optional

import torch

from .model import ModelConfig


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def paged_slots(block_table: torch.Tensor, b: int, n: int, page_size: int) -> torch.Tensor:
    """The physical slots [n] (int64) of row b's logical positions 0..n-1."""
    p = torch.arange(n, device=block_table.device)
    return block_table[b].long()[p // page_size] * page_size + p % page_size


class KVCache:
    """Static K/V storage plus the kv_valid depth mask.

    Attributes: k, v [L, B, H_kv, S, D]; kv_valid [L, B, S] uint8.
    """
    paged = False
    block_table = None

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
                f"{fmt_bytes(self.nbytes)} on {device}")
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

    def reserve(self, needs: dict) -> None:
        """Rows b of needs {b: n} will write positions < n: checks n <= max_seq_len (nothing to allocate)."""
        for b, n in needs.items():
            if n > self.max_seq_len:
                raise ValueError(f"cache overflow: row {b} needs {n} positions > max_seq_len={self.max_seq_len}")

    def release(self, b: int) -> None:
        """Forget row b's entries."""
        self.kv_valid[:, b] = 0

    def truncate(self, b: int, n: int) -> None:
        """Mask row b's positions >= n."""
        self.kv_valid[:, b, n:] = 0

    def gather(self, rows: range, n: int) -> tuple:
        """rows' k, v [L, len(rows), H_kv, S, D] and kv_valid [L, len(rows), S], as views (S >= n): what
        the prefill writes lands in the cache, and scatter() has nothing to do."""
        r = slice(rows.start, rows.stop)
        return self.k[:, r], self.v[:, r], self.kv_valid[:, r]

    def scatter(self, rows: range, starts: list, ends: list, k, v, valid) -> None:
        """A no-op: gather() gave views."""

    def state(self) -> dict:
        """Copies of k, v and kv_valid, for load_state()."""
        return {"k": self.k.clone(), "v": self.v.clone(), "kv_valid": self.kv_valid.clone()}

    def load_state(self, s: dict) -> None:
        for key in ("k", "v", "kv_valid"):
            getattr(self, key).copy_(s[key])


class PoolFull(RuntimeError):
    """The paged cache's pool has too few free pages for a request; nothing was changed."""


class PagedKVCache:
    """K/V in a pool of fixed-size pages shared by the rows, given to a row as it grows (README, "Paged KV
    cache"; the layout of vLLM and FlashInfer).

    Attributes: k, v [L, P, page_size, H_kv, D]; kv_valid [L, P, page_size] uint8; block_table [B, max_pages]
    int32 on the device, row b's position p in slot block_table[b, p // page_size] * page_size +
    p % page_size (entries past a row's pages are 0 and never read). The host keeps a copy of the table
    (host_block_table()), how many pages each row holds (pages(b)) and the free list. A page's kv_valid is
    zeroed when it is given to a row, so a row never sees a former owner's entries. A request the pool
    cannot hold raises PoolFull and changes nothing.
    """
    paged = True

    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq_len: int, device, dtype: torch.dtype,
                 page_size: int = 16, num_pages: Optional[int] = None, log=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an integer >= 1, got {page_size!r}")
        self.max_pages = -(-max_seq_len // page_size)
        if num_pages is None:
            num_pages = max_batch * self.max_pages      # every row can reach max_seq_len
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be an integer >= 1, got {num_pages!r}")
        L, H_kv, D = cfg.num_layers, cfg.kv_heads, cfg.head_dim
        self.page_size, self.num_pages, self._max_seq_len = page_size, num_pages, max_seq_len
        self.shape = (L, num_pages, page_size, H_kv, D)
        # as many bytes as a contiguous cache of num_pages * page_size positions
        self.nbytes = KVCache.bytes_needed(cfg, 1, num_pages * page_size, dtype)
        if log is not None:
            log(f"KV cache: 2 x {list(self.shape)} {str(dtype).replace('torch.', '')} + mask = "
                f"{fmt_bytes(self.nbytes)} on {device} ({num_pages} pages of {page_size} positions)")
        self.k = torch.zeros(self.shape, device=device, dtype=dtype)
        self.v = torch.zeros(self.shape, device=device, dtype=dtype)
        self.kv_valid = torch.zeros(self.shape[:3], device=device, dtype=torch.uint8)
        self.block_table = torch.zeros(max_batch, self.max_pages, device=device, dtype=torch.int32)
        self._table = torch.zeros(max_batch, self.max_pages, dtype=torch.int32)   # its host copy
        self._held = [0] * max_batch          # row b holds pages _table[b, :_held[b]]
        self._free = list(range(num_pages - 1, -1, -1))     # pop() hands out page 0 first

    @property
    def max_batch(self) -> int:
        return len(self._held)

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages(self, b: int) -> list:
        """Row b's page ids, in order of position."""
        return self._table[b, :self._held[b]].tolist()

    def pages_needed(self, b: int, n: int) -> int:
        """How many more pages row b needs to hold positions [0, n)."""
        return max(0, -(-n // self.page_size) - self._held[b])

    def reserve(self, needs: dict) -> None:
        """Give each row b of needs {b: n} the pages for its positions [0, n) it does not hold yet; all or
        nothing (PoolFull if the free pages do not cover every row)."""
        for b, n in needs.items():
            if n > self._max_seq_len:
                raise ValueError(f"cache overflow: row {b} needs {n} positions > max_seq_len={self._max_seq_len}")
        want = {b: self.pages_needed(b, n) for b, n in needs.items()}
        total = sum(want.values())
        if total > len(self._free):
            raise PoolFull(f"the KV page pool is full: {total} more pages of {self.page_size} positions needed "
                           f"(rows {sorted(b for b, k in want.items() if k)}), {len(self._free)} of "
                           f"{self.num_pages} free; finish a request, or create the cache with more num_pages")
        for b, k in want.items():
            if not k:
                continue
            new = [self._free.pop() for _ in range(k)]
            self.kv_valid[:, new] = 0
            first = self._held[b]
            self._held[b] += k
            self._table[b, first:first + k] = torch.tensor(new, dtype=torch.int32)
            self.block_table[b, first:first + k] = self._table[b, first:first + k]

    def release(self, b: int) -> None:
        """Return row b's pages to the pool."""
        self._free += reversed(self.pages(b))
        self._held[b] = 0
        self._table[b] = 0
        self.block_table[b] = 0

    def truncate(self, b: int, n: int) -> None:
        """Mask row b's positions >= n and return the pages wholly past n."""
        keep = -(-n // self.page_size)
        pages = self.pages(b)
        if n % self.page_size and keep <= len(pages):
            self.kv_valid[:, pages[keep - 1], n % self.page_size:] = 0
        self._free += reversed(pages[keep:])
        self._held[b] = min(keep, len(pages))
        self._table[b, keep:] = 0
        self.block_table[b, keep:] = 0

    def reset(self) -> None:
        """Return every row's pages."""
        for b in range(self.max_batch):
            self.release(b)

    def host_block_table(self) -> torch.Tensor:
        """The host copy of block_table [B, max_pages] int32 (no device read), e.g. for engine.plan(...,
        block_table=). Read it only: reserve() / release() / truncate() keep the two equal."""
        return self._table

    def slots(self, b: int, n: int) -> torch.Tensor:
        """The physical slots [n] int64 (device) of row b's positions 0..n-1 (held pages only)."""
        return paged_slots(self._table, b, n, self.page_size).to(self.k.device)

    def gather(self, rows: range, n: int) -> tuple:
        """Copies of rows' positions 0..n-1 in the contiguous layout: k, v [L, len(rows), H_kv, n, D],
        kv_valid [L, len(rows), n] (positions a row holds no page for are 0)."""
        L, _, _, H_kv, D = self.shape
        k = self.k.new_zeros(L, len(rows), H_kv, n, D)
        v, valid = torch.zeros_like(k), self.kv_valid.new_zeros(L, len(rows), n)
        kf, vf, validf = self._flat()
        for i, b in enumerate(rows):
            m = min(n, self._held[b] * self.page_size)
            s = self.slots(b, m)
            k[:, i, :, :m] = kf[:, s].transpose(1, 2)
            v[:, i, :, :m] = vf[:, s].transpose(1, 2)
            valid[:, i, :m] = validf[:, s]
        return k, v, valid

    def scatter(self, rows: range, starts: list, ends: list, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor) -> None:
        """Write positions [starts[i], ends[i]) of gather()-layout tensors back to row rows[i]'s pages."""
        kf, vf, validf = self._flat()
        for i, b in enumerate(rows):
            s = self.slots(b, ends[i])[starts[i]:]
            kf[:, s] = k[:, i, :, starts[i]:ends[i]].transpose(1, 2)
            vf[:, s] = v[:, i, :, starts[i]:ends[i]].transpose(1, 2)
            validf[:, s] = valid[:, i, starts[i]:ends[i]]

    def _flat(self) -> tuple:
        L, P, ps, H_kv, D = self.shape
        return self.k.view(L, P * ps, H_kv, D), self.v.view(L, P * ps, H_kv, D), self.kv_valid.view(L, P * ps)

    def state(self) -> dict:
        """Copies of everything a request leaves here, for load_state()."""
        return {"k": self.k.clone(), "v": self.v.clone(), "kv_valid": self.kv_valid.clone(),
                "block_table": self.block_table.clone(), "rows": [self.pages(b) for b in range(self.max_batch)],
                "free": list(self._free)}

    def load_state(self, s: dict) -> None:
        for key in ("k", "v", "kv_valid", "block_table"):
            getattr(self, key).copy_(s[key])
        self._table.copy_(s["block_table"])
        self._held, self._free = [len(r) for r in s["rows"]], list(s["free"])
