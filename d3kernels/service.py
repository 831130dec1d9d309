"""One engine loop over a Server: requests in through a bounded queue, tokens out as they are sampled.

    engine = Engine(server, max_queue=64)
    engine.start()                                      # the loop's thread
    h = engine.submit(prompt_ids, max_new_tokens=64, sink=on_tokens)   # QueueFull / Draining / ValueError
    # on_tokens(h, new_tokens, finished) runs on the loop's thread after each step that gave h tokens
    engine.cancel(h)                                    # stopped at the next step; its pages return
    engine.stats()                                      # queue, live, steps, pages free / promised
    engine.drain(grace_s); engine.stop()                # shutdown: finish or abort, then join

The loop's thread is the only caller of the Server (add, step, finish): the Server is not thread-safe, and
one owner keeps its steps in one place. Other threads reach the loop through submit / cancel / drain /
stop, which hold a lock for a moment and wake it.

Admission is first come, first served. The request at the head of the queue enters when a slot is free
and, on a paged cache, the pages not yet promised to live requests cover its prompt plus max_new_tokens:
each live request is promised the pages of its whole length when it enters, so a step never meets a full
pool (the Server would raise PoolFull and leave preemption to the caller; promising up front needs none,
at the price of pages held for tokens a request may never generate). A request whose length cannot fit
at all is refused at submit() with ValueError; one that fits waits. The queue holds at most max_queue
requests that wait for a slot; submit() raises QueueFull beyond that, at once.

A request ends with finished = "eos" | "length" (the Server's), "cancelled" (cancel()), "abort" (shutdown,
or the queue was drained) or "error" (an exception in the loop, in .error). The sink is called once with
the finished value, after which nothing more is sent for that request.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from .serving import Server


class QueueFull(RuntimeError):
    """The engine's queue holds max_queue waiting requests; nothing was queued."""


class Draining(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)      # a request is itself, whatever its fields hold
class Handle:
    """One request as the engine sees it. Written by the loop's thread only; read the final values after the
    sink got `finished`. tokens: generated ids; layers: kept layers per token (token 0: the prompt pass)."""
    id: int
    prompt: list
    max_new_tokens: int
    options: dict                       # Server.add's keywords: ignore_eos, temperature, top_k, top_p, seed, alpha
    sink: Optional[Callable] = None     # sink(handle, new_tokens: list, finished: Optional[str])
    state: str = "queued"               # "queued" | "live" | "done"
    rid: Optional[int] = None           # the Server's request id, once live
    tokens: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    finished: Optional[str] = None
    error: Optional[str] = None
    pages: int = 0                      # pages promised to it while live
    submitted: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None  # host clock when its first token was sampled


class Engine:
    """The loop over a Server (see the module docstring).

    Args: server (its slots and paged pool are the engine's capacity); max_queue: requests that may wait for
    the loop to admit them (>= 1); log: callable(str) or None; idle_wait_s: how long the idle loop sleeps
    between checks when nothing wakes it.
    """

    def __init__(self, server: Server, max_queue: int = 64, log=None, idle_wait_s: float = 0.5):
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.server, self.max_queue, self.log, self.idle_wait_s = server, max_queue, log, idle_wait_s
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._cancels: list = []
        self._live: dict = {}               # Server rid -> Handle
        self._ids = itertools.count()
        self._draining = False
        self._deadline: Optional[float] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._counts = {"submitted": 0, "rejected_full": 0, "completed": 0, "cancelled": 0, "aborted": 0,
                        "errors": 0, "steps": 0, "tokens": 0, "peak_live": 0, "peak_queued": 0}
        cache = server.cache
        self.paged = bool(getattr(cache, "paged", False))
        self._promised = 0                  # pages promised to live requests

    # ------------------------------------------------------------------ other threads
    def pages_for(self, n: int) -> int:
        """Pages a request of n positions (prompt + new tokens) is promised (0 on a contiguous cache)."""
        return -(-n // self.server.cache.page_size) if self.paged else 0

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError if a request of this length can never run here (longer than max_seq_len, or more pages
        than the whole pool)."""
        cache, n = self.server.cache, prompt_len + max_new_tokens
        if n > cache.max_seq_len:
            raise ValueError(f"the prompt has {prompt_len} tokens; with {max_new_tokens} new tokens it needs {n} "
                             f"positions, more than the {cache.max_seq_len} this server holds per request")
        if self.paged and self.pages_for(n) > cache.num_pages:
            raise ValueError(f"the prompt has {prompt_len} tokens; with {max_new_tokens} new tokens it needs "
                             f"{self.pages_for(n)} pages of {cache.page_size} positions, more than the pool's "
                             f"{cache.num_pages}")

    def submit(self, prompt: list, max_new_tokens: int, sink: Optional[Callable] = None, **options) -> Handle:
        """Queue a request (prompt: token ids; options: Server.add's ignore_eos, temperature, top_k, top_p,
        seed, alpha). Raises ValueError if it can never fit, QueueFull if max_queue requests wait already,
        Draining during shutdown; each before anything is queued."""
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token")
        self.check_fits(len(prompt), max_new_tokens)
        with self._cond:
            if self._draining or self._stopping:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                self._counts["rejected_full"] += 1
                raise QueueFull(f"{len(self._queue)} requests wait already (max_queue={self.max_queue}); "
                                "retry later")
            h = Handle(next(self._ids), list(prompt), max_new_tokens, dict(options), sink)
            self._queue.append(h)
            self._counts["submitted"] += 1
            self._counts["peak_queued"] = max(self._counts["peak_queued"], len(self._queue))
            self._cond.notify()
        return h

    def cancel(self, h: Handle) -> None:
        """Stop request h at the loop's next turn (queued: it never starts; live: the Server finishes it and
        its pages return). A request that has ended already is left as it is."""
        with self._cond:
            if h.state != "done":
                self._cancels.append(h)
                self._cond.notify()

    def drain(self, grace_s: float) -> None:
        """Start shutting down: refuse new requests, abort the queued ones now, let the live ones run for up
        to grace_s seconds, then abort them."""
        with self._cond:
            if not self._draining:
                self._draining = True
                self._deadline = time.perf_counter() + max(0.0, grace_s)
            self._cond.notify()

    @property
    def draining(self) -> bool:
        return self._draining

    def start(self) -> "Engine":
        """Start the loop's thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="d3kernels-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Abort whatever is left, end the loop and join its thread; returns whether it ended in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def stats(self) -> dict:
        """A consistent snapshot: queued, live, slots, counts (submitted, rejected_full, completed, cancelled,
        aborted, errors, steps, tokens, the peaks of live and queued requests) and, on a paged cache,
        num_pages, free_pages and promised_pages."""
        with self._cond:
            s = {"queued": len(self._queue), "live": len(self._live), "slots": self.server.max_batch,
                 "max_queue": self.max_queue, "draining": self._draining, **self._counts}
            cache = self.server.cache
            if self.paged:
                s.update(num_pages=cache.num_pages, free_pages=cache.free_pages, promised_pages=self._promised,
                         page_size=cache.page_size)
            return s

    # ------------------------------------------------------------------ the loop's thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._cancels or self._live or self._stopping):
                    self._cond.wait(self.idle_wait_s)
                cancels, self._cancels = self._cancels, []
                stopping = self._stopping
                abort_queue = self._draining or stopping
                abort_live = stopping or (self._draining and time.perf_counter() >= self._deadline)
                queued = list(self._queue) if abort_queue else []
                if abort_queue:
                    self._queue.clear()
            for h in cancels:
                self._end(h, "cancelled")
            for h in queued:
                self._end(h, "abort")
            if abort_live:
                for h in list(self._live.values()):
                    self._end(h, "abort")
            if stopping:
                return
            self._admit()
            if self._live:
                self._step()

    def _admit(self) -> None:
        """Move queued requests into free slots while the head of the queue fits (first come, first served)."""
        server = self.server
        while True:
            with self._cond:
                if not self._queue or len(self._live) >= server.max_batch:
                    return
                h = self._queue[0]
                need = self.pages_for(len(h.prompt) + h.max_new_tokens)
                if self.paged and need > server.cache.num_pages - self._promised:
                    return
                self._queue.popleft()
                h.state, h.pages = "live", need
                self._promised += need
            try:
                h.rid = server.add(h.prompt, h.max_new_tokens, **h.options)
            except Exception as e:   # a request the Server refuses fails alone
                with self._cond:
                    self._promised -= h.pages
                h.error = f"{type(e).__name__}: {e}"
                self._end(h, "error")
                continue
            r = server.result(h.rid)
            with self._cond:
                self._live[h.rid] = h
                self._counts["peak_live"] = max(self._counts["peak_live"], len(self._live))
            if r.tokens:   # else its prompt prefills chunk by chunk (Server prefill_chunk), in the steps
                self._deliver(h, list(r.tokens), r.layers, r.finished)

    def _step(self) -> None:
        """One Server step; each live request's new token goes to its sink."""
        try:
            new = self.server.step()
        except Exception as e:  # the loop outlives a failed step: its requests end with the error
            msg = f"{type(e).__name__}: {e}"
            if self.log is not None:
                self.log(f"step failed, ending {len(self._live)} requests: {msg}\n{traceback.format_exc()}")
            for h in list(self._live.values()):
                h.error = msg
                self._end(h, "error")
            return
        with self._cond:
            self._counts["steps"] += 1
        for rid, tok in new.items():
            h = self._live.get(rid)
            if h is not None:
                r = self.server.result(rid)
                self._deliver(h, [tok], r.layers[-1:], r.finished)

    def _deliver(self, h: Handle, toks: list, layers: list, finished: Optional[str]) -> None:
        if toks and h.first_token is None:
            h.first_token = time.perf_counter()
        h.tokens += toks
        h.layers += [len(k) for k in layers]
        with self._cond:
            self._counts["tokens"] += len(toks)
        if finished is not None:
            self._close(h, finished)
        self._send(h, toks, finished)

    def _end(self, h: Handle, why: str) -> None:
        """End request h now (queued, live or already done) and tell its sink."""
        if h.state == "done":
            return
        if h.state == "queued":
            with self._cond:
                if h in self._queue:
                    self._queue.remove(h)
        elif h.state == "live" and h.rid in self.server.live:
            self.server.finish(h.rid)           # its slot and pages return now
        self._close(h, why)
        self._send(h, [], why)

    def _close(self, h: Handle, why: str) -> None:
        with self._cond:
            if h.state == "live":
                self._live.pop(h.rid, None)
                self._promised -= h.pages
            h.state, h.finished = "done", why
            key = {"eos": "completed", "length": "completed", "cancelled": "cancelled", "abort": "aborted",
                   "error": "errors"}[why]
            self._counts[key] += 1

    def _send(self, h: Handle, toks: list, finished: Optional[str]) -> None:
        if h.sink is None:
            return
        try:
            h.sink(h, toks, finished)
        except Exception as e:  # a consumer's failure (say, its event loop closed) is not the loop's
            if self.log is not None:
                self.log(f"request {h.id}: its sink failed: {type(e).__name__}: {e}")
