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
