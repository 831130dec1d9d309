"""Serving D3: requests join and leave between steps, and the rows of one batch sit at different D3 steps.

    server = d3kernels.Server(model, D3Schedule(L), max_batch=8, max_seq_len=2048)
    rid = server.add(prompt_ids, max_new_tokens=64)    # prefilled now, in a free slot
    while server.live:
        for rid, token in server.step().items():       # one decode step of every live request
            ...
    server.result(rid)                                 # the request's tokens, and why it stopped

Each request has its own step index i, so its own kept set. A step runs the union of the live requests'
kept sets; since the sets are nested, that is the youngest request's. At each layer of the union, a row
whose own schedule skips the layer passes its hidden state through unchanged (it is an inactive row for
that layer's launches) and writes K/V by the fill policy: "mask" writes nothing (kv_valid stays 0, zeroed
when the slot was taken), "project" and "copy" write through write_kv. Which rows run which layer is one
[L, B] mask in device memory, rewritten in place every step, so a captured CUDA graph (one per union kept
set) stays valid whatever the rows' steps are.

On a paged cache (page_size=), a request takes pages as it grows: add() the prompt's, step() a page for
every row that crosses into a new one, finish/EOS/length returns them. When the pool cannot give a page,
add() or step() raises cache.PoolFull before doing anything: the caller finishes (preempts) a request
and retries; nothing is corrupted and the other requests continue as if it had not happened.

Each request may bring its own sampling (temperature, top_k, top_p, and a seed for its own generator) and
its own alpha: a schedule that differs from the server's only in alpha (D3Schedule.with_alpha) drops layers
in the same order, so its kept sets are among the server's nested sets and the step's plan, masks and
graphs are the same ones (engine.plan's schedules=); nothing else changes.

A new request is prefilled at full depth (the batched prefill; it is not where D3 saves time), in its own
call beside the decode step, so a decode step's launches never depend on prompt lengths. By default add()
prefills the whole prompt, and every running request waits for it. With prefill_chunk=n, add() prefills the
first n tokens and each step() one more chunk of n (of the oldest request still prefilling; continued
prefill into its slot) before the decode step: a long prompt delays the others' steps by one chunk at a
time instead of all at once, and its own first token comes from the step() that prefills its last chunk.

This module holds the serving state (requests, slots, step indices). The device state and the step are
d3kernels.step.StepCore's, shared with single-request decoding: a serving step is
`core.run(core.plan(steps))` with each slot's own step index.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checks import check_sampling, token_rows
from .model import Model
from .schedule import D3Schedule
from .step import StepCore


@dataclass
class Request:
    """One request: its slot, prompt, generated tokens and step index (the index of its next token)."""
    rid: int
    slot: int
    prompt: list
    max_new_tokens: int
    eos: frozenset
    tokens: list = field(default_factory=list)
    i: int = 1
    finished: Optional[str] = None          # "eos" | "length" | "cancelled"
    layers: list = field(default_factory=list)   # kept layers of each of its steps (step 0: the prompt)
    schedule: Optional[D3Schedule] = None   # the schedule it runs (the server's, or the server's at its alpha)
    sampling: Optional[tuple] = None        # its own (temperature, top_k, top_p), or None: the server's
    generator: Optional[torch.Generator] = None   # its own generator (with its own sampling)
    pending: list = field(default_factory=list)   # prompt ids not prefilled yet (prefill_chunk)


class Server:
    """Continuous batching with D3 over one StepCore: add(), step(), finish(), result().

    Args: as Decoder (max_batch is the number of slots; page_size / num_pages: a paged KV cache whose
    pages the requests share). temperature etc.: the sampling of requests that bring none of their own
    (they share one generator, seeded by seed). prefill_chunk: None (default) prefills a prompt whole in
    add(); n >= 1 prefills it n tokens a step (see the module's docstring).
    """

    def __init__(self, model: Model, schedule: Optional[D3Schedule] = None, max_batch: int = 8,
                 max_seq_len: int = 2048, backend: str = "auto", fill: str = "mask", temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, cuda_graphs=None, log=None,
                 page_size: Optional[int] = None, num_pages: Optional[int] = None,
                 prefill_chunk: Optional[int] = None):
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.schedule = schedule if schedule is not None else D3Schedule(model.config.num_layers)
        self.core = StepCore(model, self.schedule, max_batch, max_seq_len, backend, fill, cuda_graphs, log,
                             page_size, num_pages)
        check_sampling(temperature, top_k, top_p)
        self.model, self.fill = model, fill
        self.sampling = (temperature, top_k, top_p)
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device=model.device)
            self.generator.manual_seed(seed if seed is not None else torch.seed())
        self._slots: list = [None] * max_batch
        self._ids = itertools.count()
        self.requests: dict = {}
        self.step_depths: list = []          # union depth of every step run
        self.row_depths: list = []           # per step: the mean of the live rows' own depths

    @property
    def cache(self):
        return self.core.cache

    @property
    def max_batch(self) -> int:
        """The number of slots."""
        return len(self._slots)

    # ------------------------------------------------------------------ requests
    @property
    def live(self) -> list:
        """Ids of the requests still generating."""
        return [r.rid for r in self._slots if r is not None]

    def add(self, prompt, max_new_tokens: int = 64, ignore_eos: bool = False, temperature: Optional[float] = None,
            top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
            alpha: Optional[float] = None) -> int:
        """Prefill a request into a free slot; returns its id. Its first token is sampled at once
        (result(rid).tokens[0]), or with prefill_chunk by the step() that prefills its prompt's last chunk
        (add() prefills the first chunk). Raises, changing nothing, if no slot is free, it cannot fit max_seq_len,
        or (paged cache) the pool has too few free pages for its prompt (cache.PoolFull).

        temperature, top_k, top_p, seed: this request's own sampling (any of them given: the others default
        to the server's, and the request draws from its own generator, seeded by seed, so a seeded request
        samples the same tokens whatever else is in the batch). alpha: run the server's schedule at this
        alpha (D3Schedule.with_alpha; 1 = full depth)."""
        core = self.core
        rows = token_rows(prompt, self.model.config.vocab, self.model.device)
        if len(rows) != 1:
            raise ValueError(f"add() takes one prompt, got {len(rows)}")
        ids = rows[0]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        schedule = self.schedule if alpha is None else self.schedule.with_alpha(alpha)
        sampling, generator = None, None
        if (temperature, top_k, top_p, seed) != (None, None, None, None):
            t, k, p = self.sampling
            sampling = (t if temperature is None else temperature, k if top_k is None else top_k,
                        p if top_p is None else top_p)
            check_sampling(*sampling)
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise ValueError(f"seed must be an integer, got {seed!r}")
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        core.check_fit([len(ids)], max_new_tokens)
        free = [b for b, r in enumerate(self._slots) if r is None]
        if not free:
            raise RuntimeError(f"the cache is full: all {len(self._slots)} slots hold live requests "
                               f"({self.live}); retry after one finishes, or create the Server with a larger "
                               "max_batch")
        b = free[0]
        r = Request(next(self._ids), b, list(ids), max_new_tokens,
                    frozenset() if ignore_eos else frozenset(self.model.config.eos_token_ids),
                    schedule=schedule, sampling=sampling, generator=generator)
        n = len(ids) if self.prefill_chunk is None else self.prefill_chunk
        core.admit(range(b, b + 1), [ids[:n]])
        r.pending = list(ids[n:])
        self._slots[b] = r
        self.requests[r.rid] = r
        if not r.pending:
            self._first_token(r)
        return r.rid

    def finish(self, rid: int) -> None:
        """Stop a live request now (its slot is freed for the next add())."""
        r = self._live(rid)
        self._release(r, "cancelled")

    def result(self, rid: int) -> Request:
        """The request: .tokens (generated so far), .finished (None while live), .layers."""
        if rid not in self.requests:
            raise KeyError(f"no request {rid}")
        return self.requests[rid]

    # ------------------------------------------------------------------ the step
    def step(self) -> dict:
        """One decode step of every live request, after (prefill_chunk) one chunk of the oldest prompt still
        prefilling; returns {rid: its new token}, the first token of a request whose last chunk ran included.
        Requests that finish leave their slot. On a paged cache, raises cache.PoolFull if the chunk's or the
        decode rows' pages cannot be had (finish a request, then step again): changing nothing, or, when only
        the decode rows' pages are missing, after the chunk ran (it stays done)."""
        rows = [r if r is not None and not r.pending else None for r in self._slots]   # the decode step's
        live = [r for r in rows if r is not None]
        prefilling = [r for r in self._slots if r is not None and r.pending]
        out, first = {}, None   # first: the request whose last chunk runs now
        if prefilling:   # one chunk of the oldest prompt still prefilling (paged: PoolFull, no change)
            r = min(prefilling, key=lambda r: r.rid)
            self.core.admit(range(r.slot, r.slot + 1), [r.pending[:self.prefill_chunk]], continued=True)
            del r.pending[:self.prefill_chunk]
            if not r.pending:
                first = r
                out[r.rid] = self._first_token(r)
        if not live:
            return out
        p = self.core.plan([None if r is None else r.i for r in rows],    # paged: PoolFull, no decode step
                           [None if r is None else r.schedule for r in rows])
        self.core.run(p)
        # the rows on the server's sampling in one call (over every slot), then each row on its own
        self.core.sample(range(len(self._slots)), *self.sampling, self.generator)
        for r in live:
            if r.sampling is not None:
                self._sample(r)
        if first is not None and first.finished is None:   # the token buffer is the next step's input
            self.core.tokens[first.slot] = out[first.rid]
        toks = self.core.tokens.tolist()
        kept = [r.schedule.kept_layers(r.i) for r in live]
        self.step_depths.append(len(p.kept))
        self.row_depths.append(sum(len(k) for k in kept) / len(kept))
        for r, k in zip(live, kept):
            r.layers.append(k)
            r.i += 1
            out[r.rid] = toks[r.slot]
            self._emit(r, toks[r.slot])
        return out

    def run(self) -> None:
        """Step until no request is live."""
        while self.live:
            self.step()

    def stats(self) -> dict:
        """Steps run, mean union depth per step, mean depth of the rows, CUDA graphs captured, free pages
        (paged cache; None otherwise)."""
        n = len(self.step_depths)
        c = self.core.cache
        return {"steps": n, "mean_step_depth": sum(self.step_depths) / n if n else float("nan"),
                "mean_row_depth": sum(self.row_depths) / n if n else float("nan"),
                "graphs": self.core.stats()["graphs"], "backend": self.core.backend,
                "free_pages": c.free_pages if c.paged else None}

    # ------------------------------------------------------------------ internals
    def _sample(self, r: Request) -> torch.Tensor:
        """Request r's next token from its row of the logits, by its own sampling or the server's."""
        rows = range(r.slot, r.slot + 1)
        if r.sampling is None:
            return self.core.sample(rows, *self.sampling, self.generator)
        return self.core.sample(rows, *r.sampling, r.generator)

    def _first_token(self, r: Request) -> int:
        """Sample request r's first token from the logits of its prompt's last position, and emit it."""
        tok = self._sample(r).tolist()[0]
        r.layers.append(r.schedule.kept_layers(0))
        self._emit(r, tok)
        return tok

    def _emit(self, r: Request, tok: int) -> None:
        r.tokens.append(tok)
        if tok in r.eos:
            self._release(r, "eos")
        elif len(r.tokens) >= r.max_new_tokens:
            self._release(r, "length")

    def _release(self, r: Request, why: str) -> None:
        r.finished = why
        self._slots[r.slot] = None
        self.core.release(r.slot)

    def _live(self, rid: int) -> Request:
        r = self.requests.get(rid)
        if r is None or r.finished is not None:
            raise KeyError(f"request {rid} is not live")
        return r
