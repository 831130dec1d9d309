"""The engine loop under `d3kernels serve` (d3kernels.service.Engine), in process on a tiny model: admission
waits for the pages a request will need (so no step meets a full pool), a full queue is refused at once,
cancel / drain / stop end requests and return their pages, and every output equals the request run alone.
Every wait is bounded (WAIT_S)."""
import threading
import time

import pytest

from helpers import tiny_model

from d3kernels import D3Schedule, Decoder, Server
from d3kernels.service import Draining, Engine, QueueFull

WAIT_S = 60
L = 4


class Collector:
    """A sink that records each request's tokens and end, and signals when a request ends."""

    def __init__(self):
        self.tokens, self.finished, self.done = {}, {}, threading.Condition()

    def __call__(self, h, toks, finished):
        with self.done:
            self.tokens.setdefault(h.id, []).extend(toks)
            if finished is not None:
                self.finished[h.id] = finished
                self.done.notify_all()

    def wait(self, n: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.finished) >= n, WAIT_S), self.finished


def _setup(max_batch=3, num_pages=None, max_queue=8, page_size=4):
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=7)
    sched = D3Schedule(L, alpha=0.8, start=0.25, tail=1)
    server = Server(model, sched, max_batch=max_batch, max_seq_len=40, backend="reference", page_size=page_size,
                    num_pages=num_pages)
    return model, sched, server, Engine(server, max_queue=max_queue, idle_wait_s=0.05)


def _alone(model, sched, prompt, n):
    dec = Decoder(model, sched, max_batch=1, max_seq_len=40, backend="reference")
    return dec.generate([prompt], max_new_tokens=n, ignore_eos=True).tokens[0].tolist()


def test_admission_waits_for_pages_and_outputs_equal_each_run_alone():
    # 3 slots, but a pool of 20 pages of 4: two requests of 8 pages each leave 4, too few for a third
    model, sched, server, engine = _setup(max_batch=3, num_pages=20)
    sink = Collector()
    prompts = [[1 + k, 2, 3, 4 + k] for k in range(5)]
    engine.start()
    try:
        hs = [engine.submit(p, 28, sink, ignore_eos=True) for p in prompts]      # 32 positions: 8 pages each
        sink.wait(5)
        s = engine.stats()
        assert s["peak_live"] == 2 and s["completed"] == 5 and s["errors"] == 0, s
        assert s["free_pages"] == 20 and s["promised_pages"] == 0
        for h, p in zip(hs, prompts):
            assert sink.finished[h.id] == "length"
            assert sink.tokens[h.id] == h.tokens == _alone(model, sched, p, 28)
            assert len(h.layers) == 28 and h.layers[0] == L
        with pytest.raises(ValueError, match="positions"):
            engine.submit([1] * 10, 75, sink)           # 85 positions > max_seq_len: refused at once
    finally:
        assert engine.stop()


def test_full_queue_cancel_drain_and_stop():
    model, sched, server, engine = _setup(max_batch=1, max_queue=2)
    sink = Collector()
    # not started yet: submissions stay queued, so the queue's bound is exact
    a = engine.submit([1, 2, 3], 30, sink, ignore_eos=True)
    b = engine.submit([4, 5, 6], 30, sink, ignore_eos=True)
    with pytest.raises(QueueFull):
        engine.submit([7, 8], 4, sink)
    assert engine.stats()["rejected_full"] == 1 and engine.stats()["queued"] == 2
    engine.cancel(b)                                     # queued: it never starts
    engine.start()
    try:
        t0 = time.monotonic()
        while len(a.tokens) < 3 and time.monotonic() - t0 < WAIT_S:
            time.sleep(0.01)
        engine.cancel(a)                                 # live: finished at the next step
        sink.wait(2)
        assert sink.finished[b.id] == "cancelled" and sink.tokens.get(b.id, []) == []
        assert sink.finished[a.id] == "cancelled" and 3 <= len(a.tokens) < 30
        assert a.tokens == _alone(model, sched, [1, 2, 3], 30)[: len(a.tokens)]
        assert engine.stats()["free_pages"] == server.cache.num_pages
        c = engine.submit([1, 2], 30, sink, ignore_eos=True)
        d = engine.submit([3, 4], 30, sink, ignore_eos=True)
        while not c.tokens and time.monotonic() - t0 < WAIT_S:
            time.sleep(0.01)
        engine.drain(0.05)                               # d waits: aborted now; c: after the grace
        with pytest.raises(Draining):
            engine.submit([5], 2, sink)
        sink.wait(4)
        assert sink.finished[d.id] == "abort" and sink.finished[c.id] in ("abort", "length")
    finally:
        assert engine.stop()
    s = engine.stats()
    assert s["live"] == 0 and s["queued"] == 0 and s["free_pages"] == server.cache.num_pages


def test_a_failing_request_ends_alone():
    model, sched, server, engine = _setup()
    sink = Collector()
    engine.start()
    try:
        bad = engine.submit([1, 2, 500], 4, sink)           # id 500 is outside the vocabulary: add() raises
        good = engine.submit([1, 2, 3], 4, sink, ignore_eos=True)
        sink.wait(2)
        assert sink.finished[bad.id] == "error" and "500" in bad.error
        assert sink.finished[good.id] == "length" and good.tokens == _alone(model, sched, [1, 2, 3], 4)
        assert engine.stats()["free_pages"] == server.cache.num_pages
    finally:
        assert engine.stop()


def test_chunked_prefill_through_the_engine_equals_each_run_alone():
    """The engine over a Server with prefill_chunk: the first token reaches the sink from a step, and every
    output equals the request run alone."""
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=7)
    sched = D3Schedule(L, alpha=0.8, start=0.25, tail=1)
    server = Server(model, sched, max_batch=2, max_seq_len=40, backend="reference", page_size=4, prefill_chunk=3)
    engine = Engine(server, max_queue=8, idle_wait_s=0.05)
    sink = Collector()
    prompts = [[1 + k, 2, 3, 4 + k, 5, 6, 7 + k][: 3 + 2 * k] for k in range(3)]
    engine.start()
    try:
        hs = [engine.submit(p, 6, sink, ignore_eos=True) for p in prompts]
        sink.wait(3)
        for h, p in zip(hs, prompts):
            assert sink.tokens[h.id] == _alone(model, sched, p, 6) and sink.finished[h.id] == "length"
            assert h.first_token is not None
    finally:
        engine.stop()
