"""The engine-facing API, split like FlashInfer's plan / run.

    p = engine.plan(schedule, steps, fill)        # host: union kept set, [L, B] row mask, write flags
    bufs.load(p)                                   # into engine-owned device buffers (no allocation)
    engine.run_layers(torch.ops.d3k, p.kept, weights, k, v, kv_valid, h, tmp, pos, cos, sin, active,
                      eps, mask=bufs.mask, project=bufs.project_for(p), copy=bufs.copy)

On a paged KV cache, plan(..., positions=, block_table=, page_size=) also gives the write slots
(slot_mapping, -1 for empty rows), and run_layers(..., block_table=, slots=) runs the paged ops; an engine
that computes slots on the device calls write_slots() itself.

`plan` is pure host work: from each row's D3 step index (None for an empty slot) it computes the layers
the step runs (the union of the rows' kept sets: the youngest row's, since the sets are nested), which
rows run each of them, and what the rows that skip a layer write under the fill policy. `run_layers`
issues only the ops, on buffers the engine owns: no host sync and no allocation, so an engine can capture
it in its own CUDA graph (one per union kept set: the launch structure depends on nothing else) or
compile it with torch.compile(fullgraph=True). d3kernels.serving.Server is built on the same two.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .schedule import D3Schedule


@dataclass
class Plan:
    """One step's plan (host tensors). kept: the layers the step runs; mask [L, B] uint8: row b runs
    layer l; project: {layer: flags [L, B]} launches of write_kv "project" (the rows whose own skipped
    run starts at that layer, marked over the run); copy: flags [L, B] of write_kv "copy" (every layer a
    row skips) or None when no row skips a layer; active [B] uint8: the rows that run; slots: [B] int64
    write slots on a paged cache (-1: empty row), or None; positions: [B] int32, the position each row
    writes, or None (the engine keeps its own)."""
    kept: tuple
    mask: torch.Tensor
    project: dict
    copy: Optional[torch.Tensor]
    active: Optional[torch.Tensor] = None
    slots: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None

    @property
    def key(self) -> tuple:
        """What the launches of the step depend on (and nothing else): the kept layers, the layers a
        "project" write is launched at, whether a "copy" write is. One CUDA graph per key."""
        return self.kept, tuple(sorted(self.project)), self.copy is not None

    @property
    def rows(self) -> list:
        """The rows that run."""
        return self.active.nonzero().flatten().tolist()


def write_slots(block_table: torch.Tensor, pos: torch.Tensor, active: torch.Tensor, page_size: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The paged cache's slot_mapping [B] int64: block_table[b, pos[b] // page_size] * page_size +
    pos[b] % page_size for rows with active[b] = 1, -1 for the others. block_table [B, max_pages] int32,
    pos [B] int32, active [B] uint8, on the host or the device alike (tensor ops only, no host sync; the
    page of an active row's position must be in its table). out: written in place if given."""
    p = pos.long()
    page = torch.clamp(p // page_size, max=block_table.shape[1] - 1)     # inactive rows may sit at the end
    s = block_table.gather(1, page[:, None])[:, 0].long() * page_size + p % page_size
    s = torch.where(active.bool(), s, torch.full_like(s, -1))
    return s if out is None else out.copy_(s)


def _run_starts(kept: tuple, L: int) -> list:
    """The first layer of every maximal run of layers outside `kept`."""
    ks = set(kept)
    return [l for l in range(L) if l not in ks and (l == 0 or l - 1 in ks)]


def _project_layers(row_sets: set, never_skipped: set, L: int) -> list:
    """The write_kv "project" launches of a step whose rows run the kept sets `row_sets`. Rows that share
    one set: the first layer of each run it skips. Rows at different steps: every layer of the union that
    some row may skip, and the first layer of every run the union skips, which depends only on the union,
    so a serving loop's graphs do not multiply with the rows' mix of steps."""
    if len(row_sets) == 1:
        return _run_starts(next(iter(row_sets)), L)
    kept = set().union(*row_sets)
    return sorted({l for l in kept if l not in never_skipped} | set(_run_starts(tuple(kept), L)))


def plan(schedule: D3Schedule, steps: Sequence[Optional[int]], fill: str = "mask",
         positions: Optional[Sequence[int]] = None, block_table: Optional[torch.Tensor] = None,
         page_size: Optional[int] = None, schedules: Optional[Sequence[Optional[D3Schedule]]] = None) -> Plan:
    """The plan of one decode step, the only code that decides which rows run and write which layers.
    steps[b]: the D3 step index of row b's token (>= 1; 0 is a prompt token, which runs at full depth), or
    None for a row that does not run (an empty slot); a single request's step is a plan whose rows share
    one index. positions[b]: the position row b writes (plan.positions). On a paged cache, the host
    block_table [B, max_pages] int32 and page_size give plan.slots (the engine allocates the pages).
    schedules[b]: the schedule row b runs (None or absent: `schedule`); each must share `schedule`'s order
    (D3Schedule.shares_order: only alpha and decay_start may differ), so every row's kept set is still one
    of `schedule`'s nested sets and the union, the plan key, is one of at most n_flex + 1."""
    if fill not in ("mask", "project", "copy"):
        raise ValueError(f"fill must be one of ('mask', 'project', 'copy'), got {fill!r}")
    L, B = schedule.num_layers, len(steps)
    own = list(schedules or []) + [None] * (B - len(schedules or []))
    if len(own) != B:
        raise ValueError(f"expected at most {B} schedules (one per row), got {len(schedules)}")
    own = [schedule if s is None else s for s in own]
    for b, s in enumerate(own):
        if s is not schedule and not schedule.shares_order(s):
            raise ValueError(f"row {b}: its schedule {s} drops layers in another order than {schedule}; "
                             "rows of one plan may differ only in alpha and decay_start")
    for b, i in enumerate(steps):
        if i is not None and (not isinstance(i, int) or i < 0):
            raise ValueError(f"row {b}: step index {i!r} must be an integer >= 0 (0: a prompt token, full depth)")
    rows = {b: own[b].kept_layers(i) for b, i in enumerate(steps) if i is not None}
    kept = tuple(sorted(set().union(*rows.values()))) if rows else ()
    mask = torch.zeros(L, B, dtype=torch.uint8)
    for b, k in rows.items():
        mask[list(k), b] = 1
    project, copy = {}, None
    skips = any(len(k) < L for k in rows.values())
    if fill == "copy" and skips:
        copy = torch.zeros(L, B, dtype=torch.uint8)
        for b in rows:
            copy[:, b] = 1 - mask[:, b]
    elif fill == "project" and skips:
        never = set.intersection(*(set(own[b].core_layers()) for b in rows))   # a layer no row may skip
        for l in _project_layers(set(rows.values()), never, L):
            f = torch.zeros(L, B, dtype=torch.uint8)
            for b, k in rows.items():
                ks = set(k)
                if l in ks or (l > 0 and l - 1 not in ks):
                    continue                    # row b's skipped run does not start at l
                end = l
                while end < L and end not in ks:
                    end += 1
                f[l:end, b] = 1
            project[l] = f
    active = torch.tensor([i is not None for i in steps], dtype=torch.uint8)
    if positions is not None:
        if len(positions) != B:
            raise ValueError(f"expected {B} positions (one per row), got {len(positions)}")
        positions = torch.tensor(list(positions), dtype=torch.int32)
    slots = None
    if block_table is not None:
        if positions is None or page_size is None or block_table.shape[0] != B:
            raise ValueError(f"write slots need positions ({B} of them), a block_table [{B}, max_pages] and "
                             "the page_size")
        slots = write_slots(block_table, positions, active, page_size)
    return Plan(kept, mask, project, copy, active, slots, positions)


class Buffers:
    """Engine-owned device buffers for plans of L layers and B rows, allocated once: load() copies a plan
    into them in place (a captured graph or compiled step keeps seeing the same storage)."""

    def __init__(self, L: int, B: int, fill: str, device, paged: bool = False):
        """Buffers for mask [L, B], active [B], pos [B], the fill's flags and, paged=True, the write slots
        [B] int64 of plans on a paged cache."""
        self.fill = fill
        self.mask = torch.zeros(L, B, dtype=torch.uint8, device=device)
        self._project = {l: torch.zeros(L, B, dtype=torch.uint8, device=device) for l in range(L)} \
            if fill == "project" else {}
        self.copy = torch.zeros(L, B, dtype=torch.uint8, device=device) if fill == "copy" else None
        self.slots = torch.full((B,), -1, dtype=torch.int64, device=device) if paged else None
        self.active = torch.zeros(B, dtype=torch.uint8, device=device)
        self.pos = torch.zeros(B, dtype=torch.int32, device=device)

    def load(self, p: Plan) -> "Buffers":
        """Copy plan `p` in (host to device, no allocation on the device)."""
        self.mask.copy_(p.mask, non_blocking=True)
        self.active.copy_(p.active, non_blocking=True)
        if p.positions is not None:
            self.pos.copy_(p.positions, non_blocking=True)
        for l, f in p.project.items():
            self._project[l].copy_(f, non_blocking=True)
        if self.copy is not None and p.copy is not None:
            self.copy.copy_(p.copy, non_blocking=True)
        if self.slots is not None:
            if p.slots is None:
                raise ValueError("these Buffers are paged: plan with positions, block_table and page_size")
            self.slots.copy_(p.slots, non_blocking=True)
        return self

    def project_for(self, p: Plan) -> dict:
        """The project flags of plan p's launches, as views of these buffers."""
        return {l: self._project[l] for l in p.project}


def run_layers(ops, kept: tuple, weights, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_valid: torch.Tensor,
               h: torch.Tensor, tmp: torch.Tensor, pos: torch.Tensor, rope_cos: torch.Tensor,
               rope_sin: torch.Tensor, active: torch.Tensor, eps: float, mask: Optional[torch.Tensor] = None,
               project: Optional[dict] = None, copy: Optional[torch.Tensor] = None,
               block_table: Optional[torch.Tensor] = None, slots: Optional[torch.Tensor] = None,
               counts: Optional[Counter] = None) -> None:
    """The decoder layers of one step, in place: h [B, d] (tmp [B, d] is scratch) goes through the layers
    in `kept`; K/V at pos [B] go to k_cache / v_cache [L, B, H_kv, S, D] and kv_valid [L, B, S].
    ops: a backend module (backends.get(...)) or torch.ops.d3k. mask [L, B] uint8 (device): the rows
    that run each layer (default: `active` [B] for every layer); project {layer: flags [L, B]} and copy
    flags [L, B]: the fill writes (see plan()). With block_table [B, max_pages] int32 and slots [B] int64
    (write_slots()), the cache is paged: k_cache / v_cache [L, P, page_size, H_kv, D], kv_valid
    [L, P, page_size]. Issues only ops: no host sync, no allocation."""
    w = weights
    project = project or {}
    kept_set = set(kept)

    def write(flags, mode):
        if block_table is None:
            ops.write_kv(k_cache, v_cache, kv_valid, h, w.attn_norm, w.wqkv, w.bqkv, pos, rope_cos, rope_sin,
                         flags, mode, eps)
        else:
            ops.write_kv_paged(k_cache, v_cache, kv_valid, h, w.attn_norm, w.wqkv, w.bqkv, block_table, pos, slots,
                               rope_cos, rope_sin, flags, mode, eps)
        if counts is not None:
            counts["write_kv"] += 1

    for l in range(k_cache.shape[0]):
        if l in project:            # the state entering a skipped run also leaves it unchanged
            write(project[l], "project")
        if l not in kept_set:
            continue
        lw, rows = w.layers[l], active if mask is None else mask[l]
        if block_table is None:
            ops.attn_block(tmp, h, lw.attn_norm, lw.wqkv, lw.bqkv, lw.wo, k_cache[l], v_cache[l], kv_valid[l],
                           pos, rope_cos, rope_sin, rows, eps)
        else:
            ops.attn_block_paged(tmp, h, lw.attn_norm, lw.wqkv, lw.bqkv, lw.wo, k_cache[l], v_cache[l],
                                 kv_valid[l], block_table, pos, slots, rope_cos, rope_sin, rows, eps)
        ops.mlp_block(h, tmp, lw.mlp_norm, lw.w_gate_up, lw.w_down, rows, eps)
        if counts is not None:
            counts["attn_block"] += 1
            counts["mlp_block"] += 1
    if copy is not None:
        write(copy, "copy")
