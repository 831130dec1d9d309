"""Each op declared once (docs/design.md section 3.7).

From one `Op` per op come: the torch.library schema (`_ops`), the argument check of every kernel and of the
public wrapper, the public `ops.*` function (`ops`), the backend tables (`_ops`) and the CUDA launch, which
sets the C++ Args struct's fields by name (`_ops.CudaKernels`; csrc/include/d3k/ops.h lists the fields
once). Adding an argument to an op touches its declaration here, its kernels and its reference.

An argument list is written as `name` (a tensor), `name?` (a tensor or None), `name!` (a tensor the op
writes), `name:float` / `name:int` / `name:str` (scalars).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

from . import checks

_TYPES = {"float": "float", "int": "int", "str": "str"}
# torch's functionalization has an argument of its own called "mode": the schema spells ours "fill_mode"
_SCHEMA_NAMES = {"mode": "fill_mode"}


@dataclass(frozen=True)
class Op:
    """One op. args: the argument list (see the module doc). check: validates the leading arguments it
    names (checks.check_*) and returns the sizes it found, named by `sizes` (the C++ Args fields).
    dispatch: the argument whose device and dtype choose the backend, and the one whose last dimension is
    head_dim (or None). page_size_of: the argument whose dim 1 is the page size the backend must take.
    public: also an `ops.*` function (the sampling ops take a generator there instead)."""
    name: str
    args: str
    check: Callable
    sizes: tuple = ()
    dispatch: tuple = ("h", None)
    page_size_of: Optional[str] = None
    public: bool = True
    doc: str = ""
    fields: dict = field(default_factory=dict)      # argument -> C++ Args field, where the names differ
    shape: Optional[Callable] = None                # arguments -> the sizes, read without checking

    # parsed once per op (cached_property writes the instance dict, which a frozen dataclass allows): the
    # launch path reads them on every call
    @cached_property
    def params(self) -> list:
        """[(name, kind)] with kind "Tensor", "Tensor?", "Tensor!" or a scalar type."""
        out = []
        for a in (s.strip() for s in self.args.split(",")):
            if ":" in a:
                n, t = a.split(":")
                out.append((n, _TYPES[t]))
            elif a.endswith(("?", "!")):
                out.append((a[:-1], "Tensor" + a[-1]))
            else:
                out.append((a, "Tensor"))
        return out

    @cached_property
    def names(self) -> list:
        return [n for n, _ in self.params]

    @cached_property
    def _check_arity(self) -> int:
        return len(inspect.signature(self.check).parameters)

    @property
    def schema(self) -> str:
        """The torch.library schema: written tensors get alias sets (a!), (b!), ...; returns nothing."""
        parts, alias = [], iter("abcdefgh")
        for n, k in self.params:
            t = f"Tensor({next(alias)}!)" if k == "Tensor!" else k
            parts.append(f"{t} {_SCHEMA_NAMES.get(n, n)}")
        return f"{self.name}({', '.join(parts)}) -> ()"

    def check_args(self, args: tuple) -> tuple:
        """Run the check on the leading arguments it takes; returns what it returns."""
        return self.check(*args[:self._check_arity])

    def sizes_of(self, args: tuple) -> dict:
        """The sizes by C++ field name, read from the shapes alone: the arguments were checked at the
        boundary (the public op, torch.ops.d3k, the step core's construction)."""
        return dict(zip(self.sizes, self.shape(**dict(zip(self.names, args)))))


def _check_sample_greedy(tokens, logits) -> tuple:
    return checks.check_sample(tokens, logits)


def _check_sample(tokens, logits, noise, temperature, top_k, top_p) -> tuple:
    checks.check_sampling(temperature, top_k, top_p)
    return checks.check_sample(tokens, logits, noise)


_PAGED = {"k_pages": "k_cache", "v_pages": "v_cache", "kv_valid_pages": "kv_valid"}


def _heads(rows: int, H_kv: int, D: int) -> int:
    """Query heads of a fused wqkv with `rows` rows."""
    return rows // D - 2 * H_kv

OPS = {op.name: op for op in (
    Op("attn_block", "out!, h, attn_norm, wqkv, bqkv?, wo, k_cache!, v_cache!, kv_valid!, pos, rope_cos, rope_sin, "
       "row_active, eps:float", checks.check_attn_block, ("B", "d", "H", "Hkv", "D", "S"), ("h", "k_cache"),
       shape=lambda h, k_cache, wqkv, **_: (*h.shape, _heads(wqkv.shape[0], k_cache.shape[1], k_cache.shape[3]),
                                            k_cache.shape[1], k_cache.shape[3], k_cache.shape[2]),
       doc="out[B, d] = h + attention half of one layer at positions pos[B]; updates k_cache / v_cache\n"
           "[B, H_kv, S, D] and kv_valid [B, S] in place at pos (docs/design.md section 3.1)."),
    Op("mlp_block", "out!, h, mlp_norm, w_gate_up, w_down, row_active, eps:float", checks.check_mlp_block,
       ("B", "d", "F"), shape=lambda h, w_down, **_: (*h.shape, w_down.shape[1]), doc="out[B, d] = h + w_down[d, F] @ (silu(g) * u), [g; u] = w_gate_up[2F, d] @ "
                            "rmsnorm(h) * mlp_norm."),
    Op("write_kv", "k_cache!, v_cache!, kv_valid!, src_h, norms, wqkv, bqkv?, pos, rope_cos, rope_sin, flags, "
       "mode:str, eps:float", checks.check_write_kv, ("L", "B", "d", "H", "Hkv", "D", "S"), ("k_cache", "k_cache"),
       shape=lambda k_cache, src_h, wqkv, **_: (k_cache.shape[0], k_cache.shape[1], src_h.shape[1],
                                                _heads(wqkv.shape[1], k_cache.shape[2], k_cache.shape[4]),
                                                k_cache.shape[2], k_cache.shape[4], k_cache.shape[3]),
       doc="Depth-masked KV writer: k_cache / v_cache [L, B, H_kv, S, D] and kv_valid [L, B, S] updated in place\n"
           "at pos[B] for every (l, b) with flags[L, B] = 1. mode: \"mask\" | \"project\" | \"copy\" "
           "(docs/design.md section 2)."),
    Op("attn_block_paged", "out!, h, attn_norm, wqkv, bqkv?, wo, k_pages!, v_pages!, kv_valid_pages!, block_table, "
       "pos, slot_mapping, rope_cos, rope_sin, row_active, eps:float", checks.check_attn_block_paged,
       ("B", "d", "H", "Hkv", "D", "num_pages", "page_size", "max_pages"), ("h", "k_pages"), "k_pages",
       fields=_PAGED,
       shape=lambda h, k_pages, wqkv, block_table, **_: (*h.shape, _heads(wqkv.shape[0], k_pages.shape[2],
                                                                          k_pages.shape[3]),
                                                         k_pages.shape[2], k_pages.shape[3], k_pages.shape[0],
                                                         k_pages.shape[1], block_table.shape[1]),
       doc="attn_block on one layer of a paged KV cache: k_pages / v_pages [num_pages, page_size, H_kv, D],\n"
           "kv_valid_pages [num_pages, page_size], block_table [B, max_pages] int32 (row b's position p is in slot\n"
           "block_table[b, p // page_size] * page_size + p % page_size), pos [B] int32, slot_mapping [B] int64\n"
           "(the new K/V's slot; -1: the row runs nothing). Rows with row_active = 1 and slot_mapping >= 0 write\n"
           "K/V and kv_valid = 1 at their slot and attend to their positions p <= pos with kv_valid = 1; the\n"
           "others get out = h. block_table and slot values are checked on the host by the reference only."),
    Op("write_kv_paged", "k_pages!, v_pages!, kv_valid_pages!, src_h, norms, wqkv, bqkv?, block_table, pos, "
       "slot_mapping, rope_cos, rope_sin, flags, mode:str, eps:float", checks.check_write_kv_paged,
       ("L", "B", "d", "H", "Hkv", "D", "num_pages", "page_size", "max_pages"), ("k_pages", "k_pages"),
       fields=_PAGED,
       shape=lambda k_pages, src_h, wqkv, block_table, **_: (k_pages.shape[0], *src_h.shape,
                                                             _heads(wqkv.shape[1], k_pages.shape[3], k_pages.shape[4]),
                                                             k_pages.shape[3], k_pages.shape[4], k_pages.shape[1],
                                                             k_pages.shape[2], block_table.shape[1]),
       doc="write_kv on a paged KV cache: k_pages / v_pages [L, num_pages, page_size, H_kv, D] and\n"
           "kv_valid_pages [L, num_pages, page_size] updated in place at slot_mapping[b] (>= 0) for every (l, b)\n"
           "with flags = 1; pos[b] is the RoPE position. mode: \"mask\" | \"project\" | \"copy\"."),
    Op("lm_head", "logits!, h, final_norm, w_lm, eps:float", checks.check_lm_head, ("B", "d", "V"),
       shape=lambda h, w_lm, **_: (*h.shape, w_lm.shape[0]),
       doc="logits[B, V] float32 = w_lm[V, d] @ (rmsnorm(h[B, d]) * final_norm[d])."),
    # Sampling takes no generator (a schema cannot hold one): sample_greedy is the argmax, and sample takes its
    # randomness as a tensor, noise [B, V] float32 of Exp(1) draws (noise.exponential_(generator=g)); the same
    # noise gives the same tokens on every backend. ops.sample (with a generator) is written by hand.
    Op("sample_greedy", "tokens!, logits", _check_sample_greedy, ("B", "V"), ("logits", None), public=False),
    Op("sample", "tokens!, logits, noise, temperature:float, top_k:int, top_p:float", _check_sample, ("B", "V"),
       ("logits", None), public=False),
)}
