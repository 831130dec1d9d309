"""The decoder driver (docs/design.md section 4): prefill at full depth, then one
decode step per token that launches kernels only for the schedule's kept layers.

A thin loop with static buffers: the hidden state, logits, tokens and positions
are allocated once, so a step allocates nothing and (on CUDA) one graph per
distinct kept-layer set can be captured and replayed.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from . import backends
from .cache import KVCache, PagedKVCache, PoolFull
from .engine import run_layers, write_slots
from .model import Model, rope_tables
from .ops import FILL_MODES, check_sampling
from .prefill import prefill as batched_prefill
from .schedule import D3Schedule


@dataclass
class Generation:
    """Result of Decoder.generate.

    tokens: LongTensor [B, n] of new tokens (-1 after a row finished).
    layers: the kept-layer tuple of each step (step 0 is the prompt pass).
    finished: per row, "eos", "stop" or "length".
    timings: prefill_s, decode_s, tokens_per_s (host clock, for people, not benchmarks).
    """
    tokens: torch.Tensor
    layers: list
    finished: list
    timings: dict = field(default_factory=dict)

    @property
    def mean_layers(self) -> float:
        return sum(len(k) for k in self.layers) / max(1, len(self.layers))


def _as_rows(input_ids, vocab: int, device: torch.device) -> list:
    """Normalize input_ids (LongTensor [B, T] / [T], list of ints, or list of lists) to a list of lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.device.type not in ("cpu", device.type) or (
                input_ids.device.type == device.type and device.type != "cpu" and input_ids.device != device):
            raise ValueError(f"input_ids are on {input_ids.device}; expected the model's device {device} or cpu")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
        rows = input_ids.tolist()
    else:
        rows = list(input_ids)
        if rows and not isinstance(rows[0], (list, tuple)) and not isinstance(rows[0], torch.Tensor):
            rows = [rows]
        rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
    if not rows:
        raise ValueError("input_ids is empty: give at least one prompt")
    for b, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token")
        bad = [t for t in r if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt {b} has token ids outside [0, {vocab}): {bad[:5]}")
    return rows


class Decoder:
    """D3 decoding over a loaded Model.

    Args:
        model: a d3kernels Model (load_model()).
        schedule: a D3Schedule over model.config.num_layers layers; default
            D3Schedule(L) (alpha=0.998, start=0.5, tail=1, "bottom").
        max_batch, max_seq_len: size of the static KV cache.
        backend: "auto" | "cuda" | "triton" | "reference" for the decode ops.
        fill: what skipped layers leave in the cache: "mask" | "project" | "copy".
        cuda_graphs: capture one CUDA graph per kept-layer set (CUDA only;
            default on unless D3K_CUDA_GRAPHS=0).
        log: callable(str) for progress lines (cache size, graph capture), or None.
        page_size: None for the contiguous cache [L, B, H_kv, S, D]; else a paged cache of num_pages
            pages of page_size positions (default: enough for every row to reach max_seq_len), given to
            rows as they grow (d3kernels.cache.PagedKVCache; a full pool raises cache.PoolFull).
    """

    def __init__(self, model: Model, schedule: Optional[D3Schedule] = None, max_batch: int = 1,
                 max_seq_len: int = 2048, backend: str = "auto", fill: str = "mask",
                 cuda_graphs: Optional[bool] = None, log=None, page_size: Optional[int] = None,
                 num_pages: Optional[int] = None):
        cfg = model.config
        if schedule is None:
            schedule = D3Schedule(cfg.num_layers)
        if schedule.num_layers != cfg.num_layers:
            raise ValueError(f"schedule is for {schedule.num_layers} layers, the model has {cfg.num_layers}")
        if fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
        if cfg.sliding_window is not None and cfg.sliding_window < max_seq_len:
            raise ValueError(f"sliding_window={cfg.sliding_window} < max_seq_len={max_seq_len}: sliding-window "
                             "attention is not supported; lower max_seq_len to at most the window")
        self.model, self.cfg, self.schedule, self.fill = model, cfg, schedule, fill
        self.device, self.dtype = model.device, model.dtype
        self.backend = backends.resolve(backend, self.device, self.dtype, cfg.head_dim, page_size)
        self.ops = backends.get(self.backend)
        self.log = log
        if page_size is None:
            if num_pages is not None:
                raise ValueError("num_pages needs a page_size (a paged cache)")
            self.cache = KVCache(cfg, max_batch, max_seq_len, self.device, self.dtype, log=log)
        else:
            self.cache = PagedKVCache(cfg, max_batch, max_seq_len, self.device, self.dtype, page_size, num_pages,
                                      log=log)
        self.rope_cos, self.rope_sin = rope_tables(cfg, max_seq_len, self.device)
        B, d, dev = max_batch, cfg.hidden, self.device
        self._h = torch.zeros(B, d, device=dev, dtype=self.dtype)
        self._h2 = torch.zeros(B, d, device=dev, dtype=self.dtype)
        self._logits = torch.zeros(B, cfg.vocab, device=dev, dtype=torch.float32)
        self._tokens = torch.zeros(B, device=dev, dtype=torch.int64)
        self._pos = torch.zeros(B, device=dev, dtype=torch.int32)
        self._active = torch.ones(B, device=dev, dtype=torch.uint8)
        self._slots = torch.full((B,), -1, device=dev, dtype=torch.int64)   # paged cache: the write slots
        self._flags = {}            # kept set -> list of (src layer run start, flags [L, B]) per skipped run
        # the reference backend reads positions on the host, so it cannot be captured
        capturable = self.device.type == "cuda" and self.backend != "reference"
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("D3K_CUDA_GRAPHS", "1") != "0"
        self.graphs_enabled = bool(cuda_graphs) and capturable
        self._graphs = {}           # kept set -> torch.cuda.CUDAGraph
        self._graph_stats = {"captured": 0, "capture_s": 0.0, "pool_bytes": 0}
        self._pool = None
        self.op_calls = Counter()   # launches issued by eager steps, per op
        self.batch = 0              # rows of the current request
        self.i = 0                  # index of the token the next step generates
        self._seq_len = [0] * B     # host copy of each row's next position
        self._conv = None           # per row: the conversation's token ids (stream() keeps it; see continue_)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the current request: clear the depth mask, positions and step index."""
        self.cache.reset()
        self._pos.zero_()
        self._seq_len = [0] * self.cache.max_batch
        self.batch = 0
        self.i = 0
        self._conv = None

    def snapshot(self) -> dict:
        """Copies of the request state (cache, depth mask, positions, step index, last logits), for
        restore(): e.g. to score many schedules after one prompt pass."""
        return {**self.cache.state(), "pos": self._pos.clone(), "seq_len": list(self._seq_len),
                "active": self._active.clone(), "logits": self._logits.clone(), "batch": self.batch, "i": self.i}

    def restore(self, state: dict) -> None:
        """Go back to a snapshot() taken from this decoder."""
        self.cache.load_state(state)
        for dst, key in ((self._pos, "pos"), (self._active, "active"), (self._logits, "logits")):
            dst.copy_(state[key])
        self._seq_len = list(state["seq_len"])
        self.batch, self.i = state["batch"], state["i"]
        self._conv = None
        self._refresh_flags()

    def set_schedule(self, schedule: D3Schedule) -> None:
        """Use another schedule over the same layers from the next step on (graphs and flags are
        cached per kept set, so they stay valid)."""
        if schedule.num_layers != self.cfg.num_layers:
            raise ValueError(f"schedule is for {schedule.num_layers} layers, the model has {self.cfg.num_layers}")
        self.schedule = schedule

    def stats(self) -> dict:
        """Backend, cache bytes, CUDA graphs captured, their memory pool and capture time."""
        return {"backend": self.backend, "cache_bytes": self.cache.nbytes, "graphs": len(self._graphs),
                "graph_pool_bytes": self._graph_stats["pool_bytes"],
                "graph_capture_s": self._graph_stats["capture_s"], "op_calls": dict(self.op_calls)}

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids, continue_: bool = False) -> torch.Tensor:
        """Run prompts at full depth. Returns logits [B, V] of each row's last position.

        input_ids: LongTensor [B, T] / [T], or a list of token-id lists (lengths may differ).
        continue_=False starts a new request (the cache is cleared). continue_=True appends row b's
        tokens after the positions its cache holds (same B as the current request): earlier turns are
        not recomputed, and at each layer the new positions attend only to the earlier positions that
        layer holds (kv_valid). Either way the D3 step index restarts: the next step() is step 1.
        """
        rows = _as_rows(input_ids, self.cfg.vocab, self.device)
        starts = self._continuation_starts(rows, 0) if continue_ else None
        if not continue_:
            self._check_fit(rows, 0)
        self._prefill_rows(rows, starts)
        self._conv = None          # rows fed by hand: stream(continue_=True) cannot know the conversation
        return self._logits[: self.batch]

    def _continuation_starts(self, rows: list, new_tokens: int) -> list:
        """Where each row's continuation starts (its cache length); checks it fits, changes nothing."""
        if self.batch == 0:
            raise RuntimeError("continue_=True needs a request to continue: prefill or generate first")
        if len(rows) != self.batch:
            raise ValueError(f"continue_=True: the request has {self.batch} rows, got {len(rows)} prompts")
        starts = self._seq_len[: self.batch]
        for b, r in enumerate(rows):
            if starts[b] + len(r) + new_tokens > self.cache.max_seq_len:
                raise ValueError(f"cache overflow: row {b} holds {starts[b]} positions, + {len(r)} new prompt "
                                 f"tokens + {new_tokens} new tokens > max_seq_len={self.cache.max_seq_len}")
        return list(starts)

    def _prefill_rows(self, rows: list, starts: Optional[list]) -> None:
        """The full-depth pass of prefill(); starts=None is a new request."""
        if starts is None:
            self.reset()
        B = len(rows)
        T = max(len(r) for r in rows)
        ids = torch.zeros(B, T, dtype=torch.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
        ids = ids.to(self.device)
        c = self.cache
        starts = starts or [0] * B
        ends = [starts[b] + len(r) for b, r in enumerate(rows)]
        c.reserve(dict(enumerate(ends)))
        k, v, valid = c.gather(range(B), max(ends))
        batched_prefill(self._h[:B], ids, [len(r) for r in rows], self.model.weights, k, v, valid, self.rope_cos,
                        self.rope_sin, self.cfg.eps, starts=starts)
        c.scatter(range(B), starts, ends, k, v, valid)
        self.batch = B
        self._seq_len = ends + [0] * (c.max_batch - B)
        self._pos.copy_(torch.tensor(self._seq_len, dtype=torch.int32))
        self._active.zero_()
        self._active[:B] = 1
        self._refresh_flags()
        w = self.model.weights
        self.ops.lm_head(self._logits, self._h, w.final_norm, w.lm_head, self.cfg.eps)
        self.i = 1

    def truncate(self, lengths: Sequence[int]) -> None:
        """Cut row b's cache back to its first lengths[b] positions (0 <= lengths[b] <= what it holds): the
        positions after are masked (kv_valid = 0) and the next prefill(continue_=True) or step() writes
        there. For callers that manage their own tokens (an engine rewinding a request)."""
        if len(lengths) != self.batch:
            raise ValueError(f"expected {self.batch} lengths (one per row), got {len(lengths)}")
        for b, n in enumerate(lengths):
            if not 0 <= n <= self._seq_len[b]:
                raise ValueError(f"row {b}: length {n} outside [0, {self._seq_len[b]}]")
        for b, n in enumerate(lengths):
            self.cache.truncate(b, n)
            self._seq_len[b] = n
        self._pos[: self.batch].copy_(torch.tensor(self._seq_len[: self.batch], dtype=torch.int32))
        self._conv = None

    @property
    def conversation(self) -> Optional[list]:
        """Per row, the token ids of the conversation so far (prompts and generated tokens, the last
        generated one included), as kept by generate()/stream(); None after prefill()/step()/decode()."""
        return None if self._conv is None else [list(c) for c in self._conv]

    def rewind(self, lengths: Sequence[int]) -> None:
        """Cut each row's conversation back to its first lengths[b] tokens (>= 1), so that the next
        generate(continue_=True) recomputes from there, e.g. when the next prompt's tokenization of the
        earlier turns differs from the generated tokens."""
        if self._conv is None:
            raise RuntimeError("rewind() needs a conversation kept by generate()/stream()")
        if len(lengths) != len(self._conv):
            raise ValueError(f"expected {len(self._conv)} lengths (one per row), got {len(lengths)}")
        for b, n in enumerate(lengths):
            if not 1 <= n <= len(self._conv[b]):
                raise ValueError(f"row {b}: length {n} outside [1, {len(self._conv[b])}]")
        self._conv = [c[:n] for c, n in zip(self._conv, lengths)]

    def _continue_conversation(self, rows: list, new_tokens: int) -> list:
        """stream(continue_=True): cut each row's cache back to its conversation without the last token,
        which was generated but never fed, and return the rows to prefill: that token, then the new ones."""
        if self._conv is None:
            raise RuntimeError("continue_=True continues the conversation of this decoder's last generate() or "
                               "stream() (run to its end); after prefill()/step()/decode() use "
                               "prefill(ids, continue_=True)")
        if len(rows) != len(self._conv):
            raise ValueError(f"continue_=True: the conversation has {len(self._conv)} rows, got {len(rows)} prompts")
        keep = [len(c) - 1 for c in self._conv]
        for b, r in enumerate(rows):            # check everything before changing anything
            if keep[b] + 1 + len(r) + new_tokens > self.cache.max_seq_len:
                raise ValueError(f"cache overflow: row {b}'s conversation has {keep[b] + 1} tokens, + {len(r)} new "
                                 f"prompt tokens + {new_tokens} new tokens > max_seq_len={self.cache.max_seq_len}")
        conv = self._conv
        self.truncate(keep)                     # positions past the conversation (e.g. after a row's EOS)
        return [[c[-1]] + r for c, r in zip(conv, rows)]

    def _check_fit(self, rows: list, new_tokens: int) -> None:
        c = self.cache
        if len(rows) > c.max_batch:
            raise ValueError(f"{len(rows)} prompts exceed max_batch={c.max_batch}")
        longest = max(len(r) for r in rows)
        if longest + new_tokens > c.max_seq_len:
            raise ValueError(f"cache overflow: prompt of {longest} tokens + {new_tokens} new tokens > "
                             f"max_seq_len={c.max_seq_len}; create the Decoder with a larger max_seq_len")
        if c.paged:        # a new request starts from an empty pool: its prompts' pages must fit in it
            need = sum(-(-len(r) // c.page_size) for r in rows)
            if need > c.num_pages:
                raise PoolFull(f"the KV page pool is full: the prompts need {need} pages of {c.page_size} "
                               f"positions, the pool has {c.num_pages}; create the Decoder with more num_pages")

    # ------------------------------------------------------------------ decode
    def step(self, tokens) -> torch.Tensor:
        """Feed one token per row (the previous step's output) and return logits [B, V].

        Runs only schedule.kept_layers(i) for this step's index i, writes K/V at
        each row's position, then advances positions and i. The returned tensor
        is a static buffer, overwritten by the next step.
        """
        if self.batch == 0:
            raise RuntimeError("step() before prefill(): start a request with prefill(input_ids)")
        self._conv = None
        B = self.batch
        if isinstance(tokens, torch.Tensor):
            if tokens.device.type not in ("cpu", self.device.type):
                raise ValueError(f"tokens are on {tokens.device}; expected {self.device} or cpu")
            tokens = tokens.reshape(-1)
            if tokens.numel() != B:
                raise ValueError(f"expected {B} tokens (one per row), got {tokens.numel()}")
            if tokens.device.type == "cpu":
                self._check_ids(tokens.tolist())
            self._tokens[:B].copy_(tokens)
        else:
            tokens = [int(t) for t in (tokens if isinstance(tokens, (list, tuple)) else [tokens])]
            if len(tokens) != B:
                raise ValueError(f"expected {B} tokens (one per row), got {len(tokens)}")
            self._check_ids(tokens)
            self._tokens[:B].copy_(torch.tensor(tokens, dtype=torch.int64))
        return self._decode_step()

    def _check_ids(self, ids: list) -> None:
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab]
        if bad:
            raise ValueError(f"token ids outside [0, {self.cfg.vocab}): {bad[:5]}")

    def _decode_step(self) -> torch.Tensor:
        """One step from the token buffer: embed, kept layers, lm_head. Advances pos and i."""
        last = max(self._seq_len[: self.batch])
        if last + 1 > self.cache.max_seq_len:
            raise ValueError(f"cache overflow: position {last} is past max_seq_len={self.cache.max_seq_len}")
        if self.cache.paged:
            self._load_slots(range(self.batch))
        kept = self.schedule.kept_layers(self.i)
        if self.graphs_enabled:
            graph = self._graphs.get(kept)
            if graph is None:
                graph = self._capture(kept)
            graph.replay()
        else:
            self._step_body(kept)
        self._seq_len = [n + 1 if b < self.batch else n for b, n in enumerate(self._seq_len)]
        self.i += 1
        return self._logits[: self.batch]

    def _skip_runs(self, kept: tuple) -> list:
        """For a kept set: [(first skipped layer, flags [L, B] uint8, layer mask [L, 1])], one per maximal
        skipped run (fill "project"), or one entry with all skipped layers (fill "copy"). Cached per kept
        set; flags are set only for active rows."""
        runs = self._flags.get(kept)
        if runs is None:
            L, B = self.cfg.num_layers, self.cache.max_batch
            skipped = [l for l in range(L) if l not in set(kept)]
            groups = []
            for l in skipped:
                if self.fill == "project" and groups and groups[-1][-1] == l - 1:
                    groups[-1].append(l)
                elif self.fill == "copy" and groups:
                    groups[-1].append(l)
                else:
                    groups.append([l])
            runs = []
            for g in groups:
                layer_mask = torch.zeros(L, 1, dtype=torch.uint8)
                layer_mask[g] = 1
                layer_mask = layer_mask.to(self.device)
                f = torch.empty(L, B, dtype=torch.uint8, device=self.device)
                torch.mul(layer_mask, self._active[None, :], out=f)
                runs.append((g[0], f, layer_mask))
            self._flags[kept] = runs
        return runs

    def _refresh_flags(self) -> None:
        """Rows that are not active write no K/V: recompute every cached flag tensor in place
        (same storage, so captured graphs stay valid) when the set of active rows changes."""
        for runs in self._flags.values():
            for _, f, layer_mask in runs:
                torch.mul(layer_mask, self._active[None, :], out=f)

    def _step_body(self, kept: tuple, rows=None) -> None:
        """The device work of one step; allocation-free, so it can be captured in a CUDA graph.

        rows: None (every active row runs every layer in `kept`) or engine Buffers loaded with a serving
        step's plan: which rows run each layer and what the others write (d3kernels/engine.py).
        """
        w, c, cfg = self.model.weights, self.cache, self.cfg
        torch.index_select(w.embed, 0, self._tokens, out=self._h)
        if rows is None:
            project, copy, mask = *self._fill_flags(kept), None
        else:
            project, copy, mask = rows.project_for_kept(kept), rows.copy, rows.mask
        slots = (self._slots if rows is None else rows.slots) if c.paged else None
        run_layers(self.ops, kept, w, c.k, c.v, c.kv_valid, self._h, self._h2, self._pos, self.rope_cos,
                   self.rope_sin, self._active, cfg.eps, mask=mask, project=project, copy=copy,
                   block_table=c.block_table, slots=slots, counts=self.op_calls)
        self.ops.lm_head(self._logits, self._h, w.final_norm, w.lm_head, cfg.eps)
        self.op_calls["lm_head"] += 1
        self._pos.add_(self._active)     # inactive rows keep their position

    def _load_slots(self, rows: range) -> None:
        """Paged cache, before a step of `rows` (the others write nothing): give a page to every row that
        crosses into a new one (PoolFull if the pool cannot, changing nothing), then load the write slots
        computed on the host (one copy to the device, outside any graph)."""
        c = self.cache
        c.reserve({b: self._seq_len[b] + 1 for b in rows})
        active = torch.zeros(c.max_batch, dtype=torch.uint8)
        active[rows.start:rows.stop] = 1
        pos = torch.tensor(self._seq_len, dtype=torch.int32)
        self._slots.copy_(write_slots(c.host_block_table(), pos, active, c.page_size), non_blocking=True)

    def _fill_flags(self, kept: tuple) -> tuple:
        """The write_kv flags of a uniform step: ({first layer of a skipped run: flags}, copy flags or None)."""
        if self.fill == "mask" or len(kept) == self.cfg.num_layers:
            return {}, None
        runs = self._skip_runs(kept)
        if self.fill == "project":
            return {first: f for first, f, _ in runs}, None
        return {}, runs[0][1]

    def _capture(self, kept: tuple, rows=None) -> "torch.cuda.CUDAGraph":
        """Capture one decode step at this depth. Positions and tokens are device buffers, so the
        graph serves every later step with the same kept set (and, for serving steps, the same plan
        buffers, whatever they hold)."""
        t0 = time.perf_counter()
        if rows is None:
            self._skip_runs(kept)       # build the flag tensors outside capture
        saved_pos = self._pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):   # warm-up run on a side stream, as capture requires
            self._step_body(kept, rows)
        torch.cuda.current_stream().wait_stream(stream)
        self._pos.copy_(saved_pos)      # the warm-up step is redone by the first replay
        before = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_body(kept, rows)
        torch.cuda.synchronize()
        self._graph_stats["pool_bytes"] += torch.cuda.memory_reserved() - before
        self._graph_stats["capture_s"] += time.perf_counter() - t0
        self._graphs[kept if rows is None else (kept, "rows")] = graph
        if self.log is not None:
            self.log(f"captured CUDA graph for {len(kept)} layers{'' if rows is None else ' (serving)'} "
                     f"({time.perf_counter() - t0:.2f} s)")
        return graph

    # ------------------------------------------------------------------ serving (d3kernels/serving.py)
    def _admit_row(self, b: int, ids: list) -> None:
        """Prefill one request into slot b at full depth, leaving the other slots as they are; its logits
        go to logits[b]. The caller (serving.Server) checked that it fits max_seq_len; a paged pool
        without the pages raises PoolFull, changing nothing."""
        c = self.cache
        c.release(b)
        c.reserve({b: len(ids)})
        t = torch.tensor([ids], dtype=torch.int64, device=self.device)
        k, v, valid = c.gather(range(b, b + 1), len(ids))
        batched_prefill(self._h[b:b + 1], t, [len(ids)], self.model.weights, k, v, valid, self.rope_cos,
                        self.rope_sin, self.cfg.eps)
        c.scatter(range(b, b + 1), [0], [len(ids)], k, v, valid)
        self._pos[b] = len(ids)
        self._seq_len[b] = len(ids)
        self._active[b] = 1
        w = self.model.weights
        self.ops.lm_head(self._logits[b:b + 1], self._h[b:b + 1], w.final_norm, w.lm_head, self.cfg.eps)

    def _rows_step(self, kept: tuple, rows, live: list) -> torch.Tensor:
        """One serving step over every slot: the live slots (active, listed in `live`) advance one position;
        `rows` (engine Buffers, loaded) says which of them run which layer of `kept`, the union of their
        kept sets, and on a paged cache their write slots. Returns logits [B, V]."""
        if self.graphs_enabled:
            graph = self._graphs.get((kept, "rows"))
            if graph is None:
                graph = self._capture(kept, rows)
            graph.replay()
        else:
            self._step_body(kept, rows)
        for b in live:
            self._seq_len[b] += 1
        return self._logits

    def decode(self, n: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Run n decode steps after prefill() with no host sync; returns the device tensor [B, n]
        of tokens T_1..T_n (T_0 is sampled from the prefill logits first). No EOS handling:
        for throughput measurement and callers that check stops themselves."""
        if self.batch == 0:
            raise RuntimeError("decode() before prefill(): start a request with prefill(input_ids)")
        self._conv = None
        if max(self._seq_len[: self.batch]) + n > self.cache.max_seq_len:
            raise ValueError(f"cache overflow: {n} more steps do not fit in max_seq_len={self.cache.max_seq_len}")
        check_sampling(temperature, top_k, top_p)
        if self.cache.paged:        # every page the n steps need, now: PoolFull before any step runs
            self.cache.reserve({b: self._seq_len[b] + n for b in range(self.batch)})
        B = self.batch
        out = torch.empty(B, n, dtype=torch.int64, device=self.device)
        if self.i == 1:
            self.ops.sample(self._tokens[:B], self._logits[:B], temperature, top_k, top_p, generator)
        for k in range(n):
            self._decode_step()
            self.ops.sample(self._tokens[:B], self._logits[:B], temperature, top_k, top_p, generator)
            out[:, k].copy_(self._tokens[:B])
        return out

    # ------------------------------------------------------------------ generation
    def stream(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: Optional[int] = None, ignore_eos: bool = False,
               stop: Optional[Sequence[str]] = None, continue_: bool = False) -> Iterator[list]:
        """Generate as a generator: yields the list of B new token ids (-1 for finished rows) per step.

        continue_=False: a new request (the cache and step index are reset).
        continue_=True: the next turn of this decoder's last generate()/stream(): row b's conversation
        (its prompts and generated tokens, see .conversation) continues with input_ids[b]; only the
        new tokens are prefilled (at full depth, attending at each layer to the positions that layer
        holds), and the D3 step index restarts. After the loop, self.last holds the Generation
        (tokens, layers, finished, timings).
        """
        rows = _as_rows(input_ids, self.cfg.vocab, self.device)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        if continue_:
            conv = [list(c) + r for c, r in zip(self._conv or [], rows)]
            feed = self._continue_conversation(rows, max_new_tokens)
            starts = self._seq_len[: len(rows)]
        else:
            self._check_fit(rows, max_new_tokens)
            conv, feed, starts = [list(r) for r in rows], rows, None
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops and self.model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        B = len(rows)
        eos = set() if ignore_eos else set(self.cfg.eos_token_ids)
        out = torch.full((B, max_new_tokens), -1, dtype=torch.int64)
        layers, finished = [], [None] * B
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        self._prefill_rows(feed, starts)
        self._conv = conv
        t_prefill = None
        for n in range(max_new_tokens):
            if n > 0:
                kept = self.schedule.kept_layers(self.i)
                self._decode_step()
            else:
                kept = self.schedule.kept_layers(0)
            self.ops.sample(self._tokens[:B], self._logits[:B], temperature, top_k, top_p, gen)
            layers.append(kept)
            toks = self._tokens[:B].tolist()          # the caller asked for tokens: the one sync per step
            if t_prefill is None:
                t_prefill = time.perf_counter() - t0
            for b in range(B):
                if finished[b] is not None:
                    toks[b] = -1
                    continue
                out[b, n] = toks[b]
                conv[b].append(toks[b])
                if toks[b] in eos:
                    finished[b] = "eos"
                elif stops and any(s in self.model.tokenizer.decode(out[b, : n + 1].tolist()) for s in stops):
                    finished[b] = "stop"
            self._conv = conv                  # a decode step clears it (it does not know the tokens)
            yield toks
            if all(f is not None for f in finished):
                break
        sync()
        total = time.perf_counter() - t0
        steps = len(layers)
        finished = [f or "length" for f in finished]
        decode_s = total - t_prefill
        self.last = Generation(out[:, :steps], layers, finished, {
            "prefill_s": t_prefill, "decode_s": decode_s,
            "tokens_per_s": (steps - 1) / decode_s if steps > 1 and decode_s > 0 else float("nan")})

    def generate(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, ignore_eos: bool = False,
                 stop: Optional[Sequence[str]] = None, on_token=None, continue_: bool = False) -> Generation:
        """Generate up to max_new_tokens per row; returns a Generation.

        input_ids: LongTensor [B, T] / [T], or a list of B token-id lists of any lengths.
        on_token: optional callable(list of B ids) called as tokens arrive (streaming).
        continue_: continue the conversation of the last generate() in the same cache (see stream()).
        """
        for toks in self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop,
                                continue_):
            if on_token is not None:
                on_token(toks)
        return self.last
