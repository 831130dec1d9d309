"""The Decoder and the Server on a paged KV cache (d3kernels.cache.PagedKVCache).

Pages are given to rows as they grow and returned when a request ends; a page that changes owner has its
kv_valid cleared. Every result must equal the contiguous cache's bit for bit (the paged ops read the same
entries in the same order), and a pool with too few pages must raise PoolFull before anything changes.
"""
import pytest
import torch

from helpers import serve_staggered, tiny_model

from d3kernels import D3Schedule, Decoder, PoolFull, Server, backends, engine
from d3kernels.cache import PagedKVCache

L = 6


def _model(fill="mask", **kw):
    return tiny_model(L=L, d=64, H=4, H_kv=2, D=16, F=96, V=101, qkv_bias=fill == "project", seed=3, **kw)


def _sched(order="bottom"):
    return D3Schedule(L, alpha=0.8, start=0.2, tail=1, skip_order=order)


def _prompts(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


# ---------------------------------------------------------------------------------------------- the page pool
def test_pool_gives_pages_as_rows_grow_and_takes_them_back():
    cfg = _model().config
    c = PagedKVCache(cfg, 3, 40, "cpu", torch.float32, page_size=8, num_pages=6)
    assert c.max_pages == 5 and c.free_pages == 6
    c.reserve({0: 3, 1: 9})
    assert c.pages(0) == [0] and c.pages(1) == [1, 2] and c.free_pages == 3
    c.reserve({0: 8})                                  # still within its page: nothing new
    assert c.pages(0) == [0]
    assert c.block_table[1, :2].tolist() == [1, 2] and c.host_block_table().tolist() == c.block_table.tolist()
    before = (c.free_pages, c.pages(0), c.pages(1), c.block_table.clone())
    with pytest.raises(PoolFull, match="4 more pages.*3 of 6 free"):
        c.reserve({0: 17, 2: 16})                     # 2 + 2 pages: all or nothing
    assert (c.free_pages, c.pages(0), c.pages(1)) == before[:3] and torch.equal(c.block_table, before[3])
    with pytest.raises(ValueError, match="cache overflow"):
        c.reserve({2: 41})
    c.kv_valid[:, 1] = 1                               # row 1's entries
    c.truncate(1, 5)                                   # keeps page 1, positions 0..4
    assert c.pages(1) == [1] and c.free_pages == 4
    assert c.kv_valid[:, 1, :5].all() and not c.kv_valid[:, 1, 5:].any()
    c.release(1)
    assert c.pages(1) == [] and c.free_pages == 5 and not c.block_table[1].any()
    c.reserve({2: 1})                                  # page 1 changes owner: its old entries are gone
    assert c.pages(2) == [1] and not c.kv_valid[:, 1].any()
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(cfg, 1, 40, "cpu", torch.float32, page_size=0)


def test_gather_and_scatter_are_the_contiguous_layout():
    cfg = _model().config
    c = PagedKVCache(cfg, 2, 20, "cpu", torch.float32, page_size=4, num_pages=8)
    c.reserve({0: 2, 1: 3})
    c.reserve({0: 10})                                 # row 0's pages interleave with row 1's
    k, v, valid = c.gather(range(2), 10)
    assert k.shape == (L, 2, cfg.kv_heads, 10, cfg.head_dim) and valid.shape == (L, 2, 10)
    k.normal_()
    v.normal_()
    valid.fill_(1)
    c.scatter(range(2), [0, 1], [10, 3], k, v, valid)
    k2, v2, valid2 = c.gather(range(2), 10)
    assert torch.equal(k2[:, 0], k[:, 0]) and torch.equal(v2[:, 1, :, 1:3], v[:, 1, :, 1:3])
    assert valid2[:, 1].sum() == 2 * L and not k2[:, 1, :, 3:].any()   # row 1 holds only [1, 3)


# ---------------------------------------------------------------------------------------------- the Decoder
@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
@pytest.mark.parametrize("page_size", [16, 64, 3])
def test_decoder_on_pages_equals_the_contiguous_cache(fill, page_size):
    model, sched = _model(fill), _sched()
    prompts = [[5, 17, 3, 9, 2, 44, 61, 8, 1, 0, 7, 30, 12, 4, 99, 100, 3, 2], [9, 2], [1, 2, 3, 4, 5]]
    a = Decoder(model, sched, max_batch=3, max_seq_len=64, backend="reference", fill=fill)
    b = Decoder(model, sched, max_batch=3, max_seq_len=64, backend="reference", fill=fill, page_size=page_size)
    ga = a.generate(prompts, max_new_tokens=30, ignore_eos=True)
    gb = b.generate(prompts, max_new_tokens=30, ignore_eos=True)
    assert torch.equal(ga.tokens, gb.tokens) and ga.layers == gb.layers
    assert torch.equal(a.core.logits, b.core.logits)
    c = b.cache
    assert [len(c.pages(r)) for r in range(3)] == [-(-(len(p) + 29) // page_size) for p in prompts]
    ka, va, valid_a = a.cache.gather(range(3), 64)
    kb, vb, valid_b = c.gather(range(3), 64)
    assert torch.equal(valid_a, valid_b)
    m = valid_a.bool()[:, :, None, :, None].expand_as(ka)
    assert torch.equal(ka[m], kb[m]) and torch.equal(va[m], vb[m])
    # the next turn continues in the pages (only the new tokens prefilled), as in the contiguous cache
    ga = a.generate([[4, 4], [8], [50, 51, 52]], max_new_tokens=9, ignore_eos=True, continue_=True)
    gb = b.generate([[4, 4], [8], [50, 51, 52]], max_new_tokens=9, ignore_eos=True, continue_=True)
    assert torch.equal(ga.tokens, gb.tokens) and torch.equal(a.core.logits, b.core.logits)
    b.reset()
    assert c.free_pages == c.num_pages


def test_decoder_pool_too_small_is_a_clear_error():
    model, sched = _model(), _sched()
    dec = Decoder(model, sched, max_batch=2, max_seq_len=64, backend="reference", page_size=4, num_pages=3)
    with pytest.raises(PoolFull, match="prompts need 4 pages"):
        dec.generate([[1] * 9, [2] * 3], max_new_tokens=4)
    dec.prefill([[1] * 5, [2] * 3])                    # 2 + 1 pages: the pool is now empty
    with pytest.raises(PoolFull):
        dec.decode(8)                                  # checked for all 8 steps before the first runs
    assert dec.cache.free_pages == 0 and dec.lengths == [5, 3]
    dec.step([7, 7])                                   # positions 5 and 3 are in held pages
    state = dec.snapshot()
    with pytest.raises(PoolFull, match="1 more pages"):
        dec.step([7, 7])                               # row 1 reaches position 4: a fourth page
    after = dec.snapshot()
    for key in ("k", "v", "kv_valid", "block_table", "lengths", "rows", "free", "i"):
        assert state[key] == after[key] if not torch.is_tensor(state[key]) else torch.equal(state[key], after[key])
    with pytest.raises(ValueError, match="num_pages needs a page_size"):
        Decoder(model, sched, backend="reference", num_pages=3)
    with pytest.raises(ValueError, match="page_size must be an integer >= 1"):
        Decoder(model, sched, backend="reference", page_size=0)
    with pytest.raises(ValueError, match="num_pages must be an integer >= 1"):
        Decoder(model, sched, backend="reference", page_size=4, num_pages=0)
    bf16 = tiny_model(L=2, d=128, H=4, H_kv=2, D=64, F=160, V=211, dtype=torch.bfloat16)
    if backends.why_not("cuda-emu", "cpu", torch.bfloat16, 64) is None:
        with pytest.raises(RuntimeError, match="page_size 8 is not supported by the CUDA attention"):
            Decoder(bf16, D3Schedule(2), backend="cuda-emu", page_size=8)


# ---------------------------------------------------------------------------------------------- the Server
def _alone(model, sched, fill, prompt, n):
    dec = Decoder(model, sched, max_batch=1, max_seq_len=64, backend="reference", fill=fill)
    return dec.generate([prompt], max_new_tokens=n, ignore_eos=True).tokens[0].tolist()


def _check_row_validity(server, r):
    """Under fill "mask", a row's pages hold kv_valid = 1 exactly at the (layer, position) pairs it ran: the
    prompt's positions at every layer, the position of step j at r.layers[j], nothing past its length
    (a page's former owner leaves nothing behind)."""
    c = server.cache
    n = len(c.pages(r.slot)) * c.page_size
    _, _, valid = c.gather(range(r.slot, r.slot + 1), n)
    want = torch.zeros(L, n, dtype=torch.uint8)
    want[:, :len(r.prompt)] = 1
    for j, kept in enumerate(r.layers[1:], start=1):
        want[list(kept), len(r.prompt) + j - 1] = 1
    assert torch.equal(valid[:, 0], want), r.rid


@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
def test_server_on_pages_equals_each_request_alone(fill):
    """Staggered requests on a pool too small for every slot's max_seq_len, so pages change owners."""
    model, sched = _model(fill), _sched("top")
    prompts, lengths = _prompts(7), [9, 4, 12, 6, 10, 3, 8]
    arrive = {0: [0, 1], 2: [2], 3: [3], 5: [4, 5], 9: [6]}
    server = Server(model, sched, max_batch=3, max_seq_len=64, backend="reference", fill=fill, page_size=4,
                    num_pages=14)
    owners = {}

    def check(server):
        for rid in server.live:
            r = server.result(rid)
            for pg in server.cache.pages(r.slot):
                owners.setdefault(pg, set()).add(rid)
            if fill == "mask":
                _check_row_validity(server, r)

    rid_of = serve_staggered(server, prompts, lengths, arrive, check)
    assert len(rid_of) == 7 and not server.live
    assert any(len(o) > 1 for o in owners.values()), "some page must serve two requests"
    for k, rid in rid_of.items():
        assert server.result(rid).tokens == _alone(model, sched, fill, prompts[k], lengths[k]), k
    assert server.stats()["free_pages"] == 14


def test_server_full_pool_is_rejected_and_nothing_disturbed():
    model, sched = _model(), _sched()
    server = Server(model, sched, max_batch=3, max_seq_len=64, backend="reference", page_size=4, num_pages=5)
    a = server.add([5, 6, 7, 8, 9, 10, 11], max_new_tokens=12, ignore_eos=True)     # 2 pages
    b = server.add([1, 2, 3], max_new_tokens=12, ignore_eos=True)                   # 1 page
    with pytest.raises(PoolFull, match="3 more pages"):
        server.add([4] * 10, max_new_tokens=2)                                       # 3 pages, 2 free
    assert server.live == [a, b]
    for _ in range(6):                                 # a: positions 7..12 (page 4 at 8 and 12), b: 3..8
        try:
            server.step()
        except PoolFull as e:
            assert "finish a request" in str(e)
            break
    else:
        raise AssertionError("the pool must run out")
    state = server.core.state()
    tokens = {r: list(server.result(r).tokens) for r in (a, b)}
    with pytest.raises(PoolFull):
        server.step()                                  # again: still nothing changes
    after = server.core.state()
    for key in ("k", "v", "kv_valid", "block_table", "lengths", "rows", "free"):
        assert state[key] == after[key] if not torch.is_tensor(state[key]) else torch.equal(state[key], after[key])
    assert {r: server.result(r).tokens for r in (a, b)} == tokens
    server.finish(b)                                   # preempt the younger request: its pages return
    server.run()
    assert server.result(a).tokens == _alone(model, sched, "mask", [5, 6, 7, 8, 9, 10, 11], 12)
    assert server.result(b).tokens == _alone(model, sched, "mask", [1, 2, 3], 12)[:len(tokens[b])]
    assert server.stats()["free_pages"] == 5


def test_emulated_kernels_serve_from_pages():
    """The Server on the CUDA kernels' paged path (emulated build, bf16, page_size 16): bit for bit the
    same tokens as each request alone on the contiguous cache."""
    why = backends.why_not("cuda-emu", "cpu", torch.bfloat16, 64, 16)
    if why:
        pytest.skip(why)
    model = tiny_model(L=4, d=128, H=4, H_kv=2, D=64, F=160, V=211, dtype=torch.bfloat16, seed=2)
    sched = D3Schedule(4, alpha=0.8, start=0.25, tail=1)
    prompts = [[5, 17, 42] * 5, [11, 20, 8, 9, 1], [3, 4]]
    server = Server(model, sched, max_batch=2, max_seq_len=48, backend="cuda-emu", page_size=16, num_pages=4)
    rids = [server.add(prompts[0], max_new_tokens=7, ignore_eos=True)]
    for _ in range(3):
        server.step()
    rids.append(server.add(prompts[1], max_new_tokens=5, ignore_eos=True))
    for _ in range(4):
        server.step()
    rids.append(server.add(prompts[2], max_new_tokens=4, ignore_eos=True))
    server.run()
    for k, rid in enumerate(rids):
        dec = Decoder(model, sched, max_batch=1, max_seq_len=48, backend="cuda-emu")
        n = len(server.result(rid).tokens)
        assert server.result(rid).tokens == dec.generate([prompts[k]], n, ignore_eos=True).tokens[0].tolist(), k


# ---------------------------------------------------------------------------------------------- engine.plan
def test_plan_gives_the_write_slots():
    sched = _sched()
    table = torch.tensor([[3, 0, 0], [1, 4, 2], [0, 0, 0]], dtype=torch.int32)
    p = engine.plan(sched, [2, 5, None], "mask", positions=[2, 9, 0], block_table=table, page_size=4)
    assert p.slots.tolist() == [3 * 4 + 2, 2 * 4 + 1, -1]
    bufs = engine.Buffers(L, 3, "mask", "cpu", paged=True)
    assert bufs.load(p).slots.tolist() == p.slots.tolist()
    with pytest.raises(ValueError, match="these Buffers are paged"):
        bufs.load(engine.plan(sched, [2, 5, None], "mask"))
    with pytest.raises(ValueError, match="write slots need"):
        engine.plan(sched, [2, 5, None], "mask", block_table=table, page_size=4)
