"""The step core (docs/design.md section 4): the device state of D3 decoding, shared by the single-request
Decoder and the slot-based Server.

    core = StepCore(model, schedule, max_batch=4, max_seq_len=2048)
    logits = core.admit(range(2), [[1, 2, 3], [4, 5]])       # full-depth prefill of rows 0 and 1
    core.sample(range(2))                                     # their next tokens, into core.tokens
    logits = core.run(core.plan([1, 1, None, None]))          # one decode step of rows 0 and 1 at D3 step 1

It owns the KV cache, the static device buffers (hidden state, logits, tokens), the engine buffers a plan is
loaded into, the CUDA graphs (one per plan key) and the op-call counter. Each row's length (the next
position it writes) lives here and only here, on the host: a step loads the positions of its plan into a
device buffer, so nothing keeps two copies in step. Which rows run and write which layers is decided by
d3kernels.engine.plan alone; a uniform step is a plan whose rows share one step index.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Optional, Sequence

import torch

from . import backends, declare, quant
from .workspace import Workspace
from .cache import KVCache, PagedKVCache, PoolFull
from .engine import Buffers, Plan, plan as make_plan, run_layers
from .model import Model, rope_tables
from .ops import FILL_MODES, check_sampling
from .prefill import prefill as batched_prefill
from .schedule import D3Schedule


class StepCore:
    """Device state for up to max_batch rows of at most max_seq_len positions.

    Args: model; schedule (its core layers decide where fill "project" may write); max_batch, max_seq_len;
    backend ("auto" | "cuda" | "triton" | "reference"); fill ("mask" | "project" | "copy"); cuda_graphs
    (None: on unless D3K_CUDA_GRAPHS=0; CUDA and a capturable backend only); log (callable(str) or None);
    page_size / num_pages (a paged cache, see d3kernels.cache.PagedKVCache).

    Public state: cache, logits [B, V] float32 and tokens [B] int64 (static buffers, overwritten by the next
    call), lengths (per row, the next position), op_calls (launches issued by eager steps, per op).
    """

    def __init__(self, model: Model, schedule: D3Schedule, max_batch: int = 1, max_seq_len: int = 2048,
                 backend: str = "auto", fill: str = "mask", cuda_graphs: Optional[bool] = None, log=None,
                 page_size: Optional[int] = None, num_pages: Optional[int] = None):
        cfg = model.config
        if schedule.num_layers != cfg.num_layers:
            raise ValueError(f"schedule is for {schedule.num_layers} layers, the model has {cfg.num_layers}")
        if fill not in FILL_MODES:
            raise ValueError(f"fill must be one of {FILL_MODES}, got {fill!r}")
        if cfg.sliding_window is not None and cfg.sliding_window < max_seq_len:
            raise ValueError(f"sliding_window={cfg.sliding_window} < max_seq_len={max_seq_len}: sliding-window "
                             "attention is not supported; lower max_seq_len to at most the window")
        if page_size is None and num_pages is not None:
            raise ValueError("num_pages needs a page_size (a paged cache)")
        self.cfg, self.schedule, self.fill, self.log = cfg, schedule, fill, log
        self.device, self.dtype = model.device, model.dtype
        self.backend = backends.resolve(backend, self.device, self.dtype, cfg.head_dim, page_size)
        self.ops = backends.get(self.backend)
        if model.weights.packed and self.backend not in backends.PACKED_READERS:
            # weights as the checkpoint stores them are read by the cpu backend only; the others get the
            # float values (exactly: the reference's specification)
            if log is not None:
                log(f"the {self.backend} backend reads float weights: dequantizing the packed ones to {self.dtype}")
            model = model.dequantized()
        self.model = model
        # the cpu backend records each plan key's launches once and runs them as one native call
        self.programs_enabled = self.backend == "cpu" and os.environ.get("D3K_CPU_PROGRAMS", "1") != "0"
        # the reference backend reads positions on the host, so it cannot be captured
        capturable = self.device.type == "cuda" and self.backend != "reference"
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("D3K_CUDA_GRAPHS", "1") != "0"
        self.graphs_enabled = bool(cuda_graphs) and capturable
        self.op_calls = Counter()
        self.workspace = Workspace()    # this state's kernel scratch: no other decoder shares it
        self._graph_stats = {"capture_s": 0.0, "pool_bytes": 0}
        self._pool = None
        self._allocate(max_batch, max_seq_len, page_size, num_pages)

    def _allocate(self, max_batch: int, max_seq_len: int, page_size: Optional[int], num_pages: Optional[int]):
        cfg, dev, B = self.cfg, self.device, max_batch
        if page_size is None:
            self.cache = KVCache(cfg, B, max_seq_len, dev, self.dtype, log=self.log)
        else:
            self.cache = PagedKVCache(cfg, B, max_seq_len, dev, self.dtype, page_size, num_pages, log=self.log)
        self.rope_cos, self.rope_sin = rope_tables(cfg, max_seq_len, dev)
        self._h = torch.zeros(B, cfg.hidden, device=dev, dtype=self.dtype)
        self._h2 = torch.zeros(B, cfg.hidden, device=dev, dtype=self.dtype)
        self.logits = torch.zeros(B, cfg.vocab, device=dev, dtype=torch.float32)
        self.tokens = torch.zeros(B, device=dev, dtype=torch.int64)
        self._log = torch.zeros(B, max_seq_len, device=dev, dtype=torch.int64)   # the token at each position
        self._pos64 = torch.zeros(B, 1, device=dev, dtype=torch.int64)          # positions, as scatter's index
        self._bufs = Buffers(cfg.num_layers, B, self.fill, dev, paged=self.cache.paged)
        self._lengths = [0] * B
        self._graphs = {}           # plan key -> torch.cuda.CUDAGraph (captured on these buffers)
        self._programs = {}         # plan key -> recorded cpu step (d3kernels.cpu.Step) on these buffers
        self._check_ops()

    def _check_ops(self) -> None:
        """Check the metadata of every op call a step makes, once: the steps then call the backend with
        these same buffers (the layers' weights share one stacked shape), so the backends keep only their
        data checks (positions, block tables)."""
        w, c, b, lw, eps = self.model.weights, self.cache, self._bufs, self.model.weights.layers[0], self.cfg.eps
        attn = (self._h2, self._h, lw.attn_norm, lw.wqkv, lw.bqkv, lw.wo, c.k[0], c.v[0], c.kv_valid[0])
        kv = (c.k, c.v, c.kv_valid, self._h, w.attn_norm, w.wqkv, w.bqkv)
        rope = (self.rope_cos, self.rope_sin)
        if c.paged:
            declare.OPS["attn_block_paged"].check_args(attn + (c.block_table, b.pos, b.slots) + rope + (b.active, eps))
            declare.OPS["write_kv_paged"].check_args(kv + (c.block_table, b.pos, b.slots) + rope + (b.mask, "mask"))
        else:
            declare.OPS["attn_block"].check_args(attn + (b.pos,) + rope + (b.active, eps))
            declare.OPS["write_kv"].check_args(kv + (b.pos,) + rope + (b.mask, "mask"))
        declare.OPS["mlp_block"].check_args((self._h, self._h2, lw.mlp_norm, lw.w_gate_up, lw.w_down, b.active))
        declare.OPS["lm_head"].check_args((self.logits, self._h, w.final_norm, w.lm_head))
        declare.OPS["sample_greedy"].check_args((self.tokens, self.logits))

    # ------------------------------------------------------------------ rows
    @property
    def lengths(self) -> tuple:
        """Per row, the next position it writes (= the positions its cache holds)."""
        return tuple(self._lengths)

    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def history(self, rows: range) -> list:
        """Per row, the token ids whose K/V the cache holds, in position order (one device read)."""
        log = self._log[rows.start:rows.stop].cpu().tolist()
        return [log[j][: self._lengths[b]] for j, b in enumerate(rows)]

    def reset(self) -> None:
        """Forget every row."""
        self.cache.reset()
        self._lengths = [0] * self.max_batch

    def release(self, b: int) -> None:
        """Forget row b (a paged cache takes its pages back)."""
        self.cache.release(b)
        self._lengths[b] = 0

    def check_fit(self, ends: Sequence[int], new_tokens: int = 0) -> None:
        """Rows b = 0.. that will hold ends[b] positions, then new_tokens more, fit: at most max_batch rows,
        max_seq_len positions, and (paged) the rows' pages in the pool. Raises ValueError / PoolFull."""
        c = self.cache
        if len(ends) > c.max_batch:
            raise ValueError(f"{len(ends)} prompts exceed max_batch={c.max_batch}")
        for b, n in enumerate(ends):
            if n + new_tokens > c.max_seq_len:
                raise ValueError(f"cache overflow: row {b} needs {n} positions + {new_tokens} new tokens > "
                                 f"max_seq_len={c.max_seq_len}; create it with a larger max_seq_len")
        need = sum(-(-n // c.page_size) for n in ends) if c.paged else 0
        if c.paged and need > c.num_pages:
            raise PoolFull(f"the KV page pool is full: the prompts need {need} pages of {c.page_size} positions, "
                           f"the pool has {c.num_pages}; create it with more num_pages")

    def truncate(self, b: int, n: int) -> None:
        """Cut row b back to its first n positions (0 <= n <= its length): the positions after are masked
        (kv_valid = 0) and written again by the next admit or step."""
        if not 0 <= n <= self._lengths[b]:
            raise ValueError(f"row {b}: length {n} outside [0, {self._lengths[b]}]")
        self.cache.truncate(b, n)
        self._lengths[b] = n

    def admit(self, rows: range, ids: Sequence[Sequence[int]], continued: bool = False,
              every_position: bool = False) -> torch.Tensor:
        """Prefill rows[j] with the token ids ids[j] at full depth, in one batched pass. continued=False:
        the rows start empty; True: the ids go after the positions each row holds, attending at every layer
        to what that layer holds. Returns the logits [len(rows), V] of each row's last new position, or with
        every_position=True new float32 logits [N, V] of every new position, packed row after row (a verify
        pass). Raises, changing nothing, when a row would pass max_seq_len or (paged) the pool lacks the
        pages (PoolFull)."""
        starts = [self._lengths[b] if continued else 0 for b in rows]
        ends = [s + len(r) for s, r in zip(starts, ids)]
        for b, e in zip(rows, ends):
            if e > self.max_seq_len:
                raise ValueError(f"cache overflow: row {b} would hold {e} positions > max_seq_len={self.max_seq_len}")
        c = self.cache
        if not continued:
            if c.paged:     # all or nothing: count the pages the rows hold as free before releasing them
                need = sum(-(-e // c.page_size) for e in ends)
                free = c.free_pages + sum(len(c.pages(b)) for b in rows)
                if need > free:
                    raise PoolFull(f"the KV page pool is full: {need} more pages of {c.page_size} positions needed "
                                   f"(rows {list(rows)}), {free} of {c.num_pages} free; finish a request, or "
                                   "create the cache with more num_pages")
            for b in rows:
                self.release(b)
        c.reserve({b: e for b, e in zip(rows, ends)})
        T = max(len(r) for r in ids)
        t = torch.zeros(len(rows), T, dtype=torch.int64)
        for j, r in enumerate(ids):
            t[j, : len(r)] = torch.tensor(r, dtype=torch.int64)
        t = t.to(self.device)
        for j, (b, s, r) in enumerate(zip(rows, starts, ids)):
            self._log[b, s:s + len(r)] = t[j, : len(r)]
        k, v, valid = c.gather(rows, max(ends))
        h = self._h[rows.start:rows.stop]
        every = batched_prefill(h, t, [len(r) for r in ids], self.model.weights, k, v, valid, self.rope_cos,
                                self.rope_sin, self.cfg.eps, starts=starts)
        c.scatter(rows, starts, ends, k, v, valid)
        for b, e in zip(rows, ends):
            self._lengths[b] = e
        w, out = self.model.weights, self.logits[rows.start:rows.stop]
        if every_position:
            h, out = every, torch.empty(every.shape[0], self.cfg.vocab, device=self.device, dtype=torch.float32)
        with self.workspace:
            self.ops.lm_head(out, h, w.final_norm, w.lm_head, self.cfg.eps)
        return out

    # ------------------------------------------------------------------ the step
    def plan(self, steps: Sequence[Optional[int]], schedules: Optional[Sequence[Optional[D3Schedule]]] = None) -> Plan:
        """The plan of one decode step: steps[b] is row b's D3 step index (None: the row does not run; the
        list may be shorter than max_batch); schedules[b]: the schedule row b runs, if not this core's (same
        order, another alpha: engine.plan). Checks that every running row has room for one more position
        and (paged) gives a page to each row that crosses into a new one: ValueError / PoolFull before
        anything changes."""
        steps = list(steps) + [None] * (self.max_batch - len(steps))
        c = self.cache
        c.reserve({b: self._lengths[b] + 1 for b, i in enumerate(steps) if i is not None})   # checks, then pages
        paged = dict(block_table=c.host_block_table(), page_size=c.page_size) if c.paged else {}
        return make_plan(self.schedule, steps, self.fill, positions=self._lengths, schedules=schedules, **paged)

    def run(self, p: Plan) -> torch.Tensor:
        """Run plan p (from plan()): embed the token buffer, the plan's layers, lm_head. The rows that ran
        advance one position. Returns the logits buffer [max_batch, V]."""
        self.load(p)
        if self.graphs_enabled:
            graph = self._graphs.get(p.key) or self._capture(p)
            graph.replay()
        elif self.programs_enabled and self.ops is backends.get(self.backend):   # (instrumented ops: eager)
            program = self._programs.get(p.key) or self._record(p)
            self._embed()
            program.run()
            self.op_calls.update(program.counts)
        else:
            self.launch(p)
        for b in p.rows:
            self._lengths[b] += 1
        return self.logits

    def load(self, p: Plan) -> None:
        """Copy plan p into the device buffers (host to device, no allocation on the device)."""
        self._bufs.load(p)
        self._pos64.copy_(p.positions.long()[:, None], non_blocking=True)

    def launch(self, p: Plan) -> None:
        """The device work of a loaded plan, with this state's workspace: allocation-free (after the first
        call) and sync-free, so it can be captured (a benchmark times this alone). Reads the plan only
        through the loaded buffers and p.key (kept layers, project launches), so a graph captured for one
        plan replays every plan with that key."""
        with self.workspace:
            self._embed()
            self._layers(p, self.op_calls)

    def _embed(self) -> None:
        """The token buffer's embeddings into the hidden state; the tokens into the token log."""
        quant.rows(self.model.weights.embed, self.tokens, out=self._h)
        self._log.scatter_(1, self._pos64, self.tokens[:, None])     # rows that do not run: past their end

    def _layers(self, p: Plan, counts: Counter) -> None:
        """The kept layers of plan p and lm_head, as ops (counted in counts)."""
        w, c, bufs = self.model.weights, self.cache, self._bufs
        run_layers(self.ops, p.kept, w, c.k, c.v, c.kv_valid, self._h, self._h2, bufs.pos, self.rope_cos,
                   self.rope_sin, bufs.active, self.cfg.eps, mask=bufs.mask, project=bufs.project_for(p),
                   copy=bufs.copy if p.copy is not None else None, block_table=c.block_table,
                   slots=bufs.slots, counts=counts)
        # backends that can skip idle rows (cpu) compute the active rows' logits only
        extra = {"row_active": bufs.active} if getattr(self.ops, "LM_HEAD_SKIPS_IDLE_ROWS", False) else {}
        self.ops.lm_head(self.logits, self._h, w.final_norm, w.lm_head, self.cfg.eps, **extra)
        counts["lm_head"] += 1

    def _record(self, p: Plan):
        """Record the cpu backend's launches of plan p's key (run by run(), one native call per step)."""
        program = self.ops.record_step(lambda counts: self._layers(p, counts))
        self._programs[p.key] = program
        return program

    def _capture(self, p: Plan) -> "torch.cuda.CUDAGraph":
        """Capture the step of plan p's key (a warm-up run on a side stream first, as capture requires; it
        writes what the replay writes again)."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.launch(p)
        torch.cuda.current_stream().wait_stream(stream)
        before = torch.cuda.memory_reserved()
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self.launch(p)
        torch.cuda.synchronize()
        self._graph_stats["pool_bytes"] += torch.cuda.memory_reserved() - before
        self._graph_stats["capture_s"] += time.perf_counter() - t0
        self._graphs[p.key] = graph
        if self.log is not None:
            self.log(f"captured CUDA graph for {len(p.kept)} layers ({time.perf_counter() - t0:.2f} s)")
        return graph

    def sample(self, rows: range, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample rows' next tokens from the logits buffer into the token buffer (no host sync); returns
        that view [len(rows)] int64."""
        check_sampling(temperature, top_k, top_p)
        out = self.tokens[rows.start:rows.stop]
        with self.workspace:
            self.ops.sample(out, self.logits[rows.start:rows.stop], temperature, top_k, top_p, generator)
        return out

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Copies of the rows' state (cache, lengths, logits), for load_state()."""
        return {**self.cache.state(), "lengths": list(self._lengths), "logits": self.logits.clone(),
                "tokens_held": self._log.clone()}

    def load_state(self, s: dict) -> None:
        """Go back to a state() of this core."""
        self.cache.load_state(s)
        self._lengths = list(s["lengths"])
        self.logits.copy_(s["logits"])
        self._log.copy_(s["tokens_held"])

    def grow(self, max_batch: int = 0, max_seq_len: int = 0) -> bool:
        """Make room for at least max_batch rows of max_seq_len positions, keeping every row (grow-only, as
        gpt-fast's setup_caches: a core that is large enough is left as it is). Contiguous cache only.
        Returns whether it reallocated (CUDA graphs are then captured again)."""
        B, S = max(max_batch, self.max_batch), max(max_seq_len, self.max_seq_len)
        if (B, S) == (self.max_batch, self.max_seq_len):
            return False
        if self.cache.paged:
            raise ValueError("a paged cache grows by pages: create it with the num_pages and max_seq_len it needs")
        old, lengths, log, logits, tokens = self.cache, self._lengths, self._log, self.logits, self.tokens
        self.cache = None
        self._allocate(B, S, None, None)
        self._log[:old.max_batch, :old.max_seq_len].copy_(log)
        self.logits[:old.max_batch].copy_(logits)       # the last step's outputs, still to be sampled / fed
        self.tokens[:old.max_batch].copy_(tokens)
        nb, ns = old.max_batch, old.max_seq_len
        self.cache.k[:, :nb, :, :ns].copy_(old.k)          # [L, B, H_kv, S, D]
        self.cache.v[:, :nb, :, :ns].copy_(old.v)
        self.cache.kv_valid[:, :nb, :ns].copy_(old.kv_valid)
        self._lengths[:nb] = lengths
        return True

    def stats(self) -> dict:
        """Backend, cache bytes, CUDA graphs captured, their memory pool and capture time, op calls."""
        return {"backend": self.backend, "cache_bytes": self.cache.nbytes, "graphs": len(self._graphs),
                "cpu_programs": len(self._programs),
                "graph_pool_bytes": self._graph_stats["pool_bytes"],
                "graph_capture_s": self._graph_stats["capture_s"], "op_calls": dict(self.op_calls)}
