"""Continuous batching with D3 (d3kernels.serving.Server): rows at different steps in one batch.

Every request's tokens must equal the same request run alone (greedy, fp32, under D3), with staggered
arrivals and departures, for every fill mode; a request that arrives while every slot is taken is
rejected with a clear error and disturbs nothing.
"""
import pytest
import torch

from helpers import serve_staggered, tiny_model

from d3kernels import D3Schedule, Decoder, Server

L = 6


def _alone(model, sched, fill, prompt, n):
    dec = Decoder(model, sched, max_batch=1, max_seq_len=64, backend="reference", fill=fill)
    g = dec.generate([prompt], max_new_tokens=n, ignore_eos=True)
    return g.tokens[0].tolist(), g.layers


def _prompts(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
@pytest.mark.parametrize("order", ["bottom", "top"])
def test_staggered_requests_equal_each_run_alone(fill, order):
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, qkv_bias=fill == "project", seed=3)
    sched = D3Schedule(L, alpha=0.8, start=0.2, tail=1, skip_order=order)
    prompts = _prompts(7)
    lengths = [9, 4, 12, 6, 10, 3, 8]
    arrive = {0: [0, 1], 2: [2], 3: [3], 5: [4, 5], 9: [6]}   # step -> requests that arrive before it
    server = Server(model, sched, max_batch=3, max_seq_len=64, backend="reference", fill=fill)
    rid_of = serve_staggered(server, prompts, lengths, arrive)
    assert len(rid_of) == 7 and not server.live
    mixed = 0
    for k, rid in rid_of.items():
        r = server.result(rid)
        want, layers = _alone(model, sched, fill, prompts[k], lengths[k])
        assert r.finished == "length"
        assert r.tokens == want, (k, r.tokens, want)
        assert r.layers == layers
    st = server.stats()
    assert st["mean_step_depth"] >= st["mean_row_depth"]
    mixed = sum(1 for a, b in zip(server.step_depths, server.row_depths) if a != b)
    assert mixed > 0, "some steps must mix rows at different depths"


def test_full_cache_is_rejected_and_nothing_disturbed():
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=3)
    sched = D3Schedule(L, alpha=0.8, start=0.2, tail=1)
    prompts = _prompts(3, seed=1)
    server = Server(model, sched, max_batch=2, max_seq_len=32, backend="reference")
    a = server.add(prompts[0], max_new_tokens=6, ignore_eos=True)
    server.step()
    b = server.add(prompts[1], max_new_tokens=6, ignore_eos=True)
    state = server.core.state()
    with pytest.raises(RuntimeError, match="cache is full"):
        server.add(prompts[2], max_new_tokens=4)
    with pytest.raises(ValueError, match="cache overflow"):
        server.add([1] * 30, max_new_tokens=4)
    after = server.core.state()
    for key in ("k", "v", "kv_valid"):
        assert torch.equal(state[key], after[key]), key
    assert state["lengths"] == after["lengths"]
    server.run()
    for k, rid in ((0, a), (1, b)):
        assert server.result(rid).tokens == _alone(model, sched, "mask", prompts[k], 6)[0]
    c = server.add(prompts[2], max_new_tokens=4, ignore_eos=True)   # a slot is free again
    server.finish(c)
    assert server.result(c).finished == "cancelled" and not server.live
    with pytest.raises(KeyError):
        server.finish(c)


def test_union_is_the_youngest_rows_kept_set():
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=3)
    sched = D3Schedule(L, alpha=0.7, start=0.2, tail=1)
    server = Server(model, sched, max_batch=2, max_seq_len=64, backend="reference")
    server.add([1, 2, 3], max_new_tokens=20, ignore_eos=True)
    for _ in range(4):
        server.step()
    server.add([4, 5], max_new_tokens=20, ignore_eos=True)
    server.step()
    assert server.step_depths[-1] == len(sched.kept_layers(1)) > len(sched.kept_layers(5))


@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
def test_emulated_kernels_mix_depths_per_row(fill):
    """The same on the CUDA kernels (emulated build, bf16): per-layer row masks in the same launches. A row's
    results do not depend on the other rows, so batched and alone agree bit for bit."""
    from d3kernels import backends
    why = backends.why_not("cuda-emu", "cpu", torch.bfloat16, 64)
    if why:
        pytest.skip(why)
    model = tiny_model(L=4, d=128, H=4, H_kv=2, D=64, F=160, V=211, dtype=torch.bfloat16,
                       qkv_bias=fill == "project", seed=2)
    sched = D3Schedule(4, alpha=0.8, start=0.25, tail=1)
    prompts = [[5, 17, 42], [11, 20, 8, 9, 1], [3, 4]]
    server = Server(model, sched, max_batch=2, max_seq_len=32, backend="cuda-emu", fill=fill)
    rids = [server.add(prompts[0], max_new_tokens=7, ignore_eos=True)]
    for _ in range(3):
        server.step()
    rids.append(server.add(prompts[1], max_new_tokens=5, ignore_eos=True))
    server.step()
    server.step()
    server.step()
    server.step()                                     # request 0 done: its slot frees
    rids.append(server.add(prompts[2], max_new_tokens=4, ignore_eos=True))
    server.run()
    assert any(a != b for a, b in zip(server.step_depths, server.row_depths))
    for k, rid in enumerate(rids):
        dec = Decoder(model, sched, max_batch=1, max_seq_len=32, backend="cuda-emu", fill=fill)
        n = len(server.result(rid).tokens)
        want = dec.generate([prompts[k]], max_new_tokens=n, ignore_eos=True).tokens[0].tolist()
        assert server.result(rid).tokens == want, k


@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
def test_per_request_alpha_and_sampling_equal_each_run_alone(fill):
    """Requests with their own alpha (full depth, a steeper decay) and their own seeded sampling share the
    batch with requests on the server's settings: each one's tokens and kept layers equal the same request run
    alone by a Decoder with its schedule and seed, and every step's union is one of the server schedule's kept
    sets (so no new plan key, no second code path)."""
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, qkv_bias=fill == "project", seed=3)
    sched = D3Schedule(L, alpha=0.8, start=0.2, tail=1)
    prompts = _prompts(5, seed=4)
    own = [{}, {"alpha": 1.0}, {"alpha": 0.6, "temperature": 0.9, "seed": 5}, {"temperature": 1.1, "top_k": 7,
                                                                                 "seed": 6}, {"alpha": 0.95}]
    server = Server(model, sched, max_batch=3, max_seq_len=64, backend="reference", fill=fill)
    keys = []
    core_plan = server.core.plan

    def spy(steps, schedules=None):
        p = core_plan(steps, schedules)
        keys.append(p.kept)
        return p
    server.core.plan = spy
    rids, waiting = {}, list(range(5))
    for t in range(40):
        while waiting and len(server.live) < 3 and t % 2 == 0:
            k = waiting.pop(0)
            rids[k] = server.add(prompts[k], max_new_tokens=8, ignore_eos=True, **own[k])
        if not server.live and not waiting:
            break
        server.step()
    assert len(rids) == 5 and not server.live
    for k, rid in rids.items():
        s = sched.with_alpha(own[k].get("alpha", sched.alpha))
        dec = Decoder(model, s, max_batch=1, max_seq_len=64, backend="reference", fill=fill)
        sampling = {n: v for n, v in own[k].items() if n != "alpha"}
        g = dec.generate([prompts[k]], max_new_tokens=8, ignore_eos=True, **sampling)
        assert server.result(rid).tokens == g.tokens[0].tolist(), k
        assert server.result(rid).layers == g.layers, k
    nested = {sched.kept_for_count(n) for n in range(L + 1)}
    assert set(keys) <= nested and len(set(keys)) > 1
    assert server.result(rids[1]).layers == [tuple(range(L))] * 8          # alpha 1: full depth throughout


def test_row_schedules_must_share_the_skip_order():
    sched = D3Schedule(L, alpha=0.8, start=0.2, tail=1)
    other = D3Schedule(L, alpha=0.8, start=0.2, tail=1, skip_order="top")
    from d3kernels import engine
    assert engine.plan(sched, [3, 1], schedules=[sched.with_alpha(0.5), None]).kept == sched.kept_layers(1)
    with pytest.raises(ValueError, match="another order"):
        engine.plan(sched, [3, 1], schedules=[other, None])
    with pytest.raises(ValueError, match="alpha"):
        Server(tiny_model(L=L, seed=3), sched, max_batch=1, max_seq_len=16, backend="reference").add(
            [1, 2], max_new_tokens=2, alpha=1.5)


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_prefill_equals_each_run_alone(chunk):
    """prefill_chunk: add() prefills a prompt's first chunk, each step() one more of the oldest prompt still
    prefilling, beside the running rows' decode steps; every request's tokens and layers still equal the
    request run alone, and its first token comes from the step that prefilled its last chunk."""
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=3)
    sched = D3Schedule(L, alpha=0.8, start=0.2, tail=1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (2, 11, 7, 3, 9)]
    lengths = [9, 5, 6, 8, 4]
    arrive = {0: [0, 1], 1: [2], 4: [3, 4]}
    server = Server(model, sched, max_batch=3, max_seq_len=64, backend="reference", prefill_chunk=chunk)
    firsts = {}

    def after(s):   # note the step at which each request got its first token
        for rid, r in s.requests.items():
            if r.tokens and rid not in firsts:
                firsts[rid] = len(s.step_depths)
    rid_of = serve_staggered(server, prompts, lengths, arrive, after_step=after)
    assert len(rid_of) == 5 and not server.live
    for k, rid in rid_of.items():
        r = server.result(rid)
        want, layers = _alone(model, sched, "mask", prompts[k], lengths[k])
        assert r.finished == "length" and r.tokens == want and r.layers == layers, (k, r.tokens, want)
    assert any(len(p) > chunk for p in prompts) and len(firsts) == 5


def test_chunked_prefill_request_is_live_and_can_be_finished():
    """A request still prefilling holds its slot (live), yields no token until its last chunk, and finish()
    frees it; a bad prefill_chunk is refused."""
    model = tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=3)
    sched = D3Schedule(L, alpha=0.8, start=0.2, tail=1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            Server(model, sched, max_batch=2, max_seq_len=32, backend="reference", prefill_chunk=bad)
    server = Server(model, sched, max_batch=2, max_seq_len=32, backend="reference", prefill_chunk=2)
    a = server.add([5, 6, 7, 8, 9], max_new_tokens=3, ignore_eos=True)      # chunks 2 + 2 + 1
    assert server.live == [a] and server.result(a).tokens == []
    assert server.step() == {}
    out = server.step()
    assert list(out) == [a] and server.result(a).tokens == [out[a]]
    b = server.add([1, 2, 3], max_new_tokens=2, ignore_eos=True)
    server.finish(b)
    assert server.live == [a] and server.result(b).finished == "cancelled"
    server.run()
    assert server.result(a).tokens == _alone(model, sched, "mask", [5, 6, 7, 8, 9], 3)[0]
