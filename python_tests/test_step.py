"""The step core (d3kernels/step.py) and the one plan: positions, the token log, grow, plan keys and the
conversation primitive built on them (docs/design.md sections 4.1, 4.2, 4.4)."""
import pytest
import torch

from helpers import tiny_model

from d3kernels import D3Schedule, Decoder, engine
from d3kernels.step import StepCore

SCHED = dict(alpha=0.8, start=0.25, tail=1)


def _model():
    return tiny_model(L=6, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=11)


def test_lengths_are_the_one_source_of_positions():
    """plan() takes each row's position from the core's lengths; run() advances only the rows that ran."""
    core = StepCore(_model(), D3Schedule(6, **SCHED), max_batch=3, max_seq_len=32, backend="reference")
    core.admit(range(2), [[1, 2, 3], [4, 5]])
    assert core.lengths == (3, 2, 0)
    core.sample(range(3))
    p = core.plan([1, None, None])
    assert p.positions.tolist() == [3, 2, 0] and p.rows == [0]
    core.run(p)
    assert core.lengths == (4, 2, 0)
    core.run(core.plan([2, 1]))
    assert core.lengths == (5, 3, 0)
    with pytest.raises(ValueError, match="cache overflow"):
        StepCore(_model(), D3Schedule(6), max_batch=1, max_seq_len=4, backend="reference").admit(range(1), [[1] * 5])


def test_token_log_is_what_the_cache_holds():
    """history() is every token fed, in position order: prompts, step() tokens and decode()'s device tokens.
    decode() first feeds the argmax of the step() before it, then its own tokens but the last."""
    dec = Decoder(_model(), D3Schedule(6, **SCHED), max_batch=2, max_seq_len=32, backend="reference")
    dec.prefill([[5, 6, 7], [8]])
    t0 = dec.step([9, 10]).argmax(-1).tolist()
    assert t0 != [9, 10]
    out = dec.decode(4)
    assert dec.history == [[5, 6, 7, 9, t0[0]] + out[0, :3].tolist(), [8, 10, t0[1]] + out[1, :3].tolist()]
    assert dec.lengths == [8, 6]
    more = dec.decode(2)                          # a second decode() feeds the first one's last token
    assert dec.history[0][8:] == [out[0, 3].item(), more[0, 0].item()]
    dec.truncate([2, 6])
    assert dec.history[0] == [5, 6] and len(dec.history[1]) == 6


def test_continue_with_keeps_the_longest_common_prefix():
    """After decode() (which keeps no conversation) continue_with still knows what the cache holds: it keeps
    the shared prefix, prefills the rest, and at full depth equals one fresh prefill of the whole history."""
    model = _model()
    full = D3Schedule(6, alpha=1.0)
    dec = Decoder(model, full, max_batch=2, max_seq_len=40, backend="reference")
    dec.prefill([[5, 6, 7], [8, 9]])
    dec.decode(3)
    held = dec.history
    hist = [held[0] + [11, 12], held[1][:2] + [13]]          # row 1 diverges after its prompt
    logits = dec.continue_with(hist).clone()
    assert dec.prefilled == [2, 1] and dec.history == hist
    fresh = Decoder(model, full, max_batch=2, max_seq_len=40, backend="reference")
    want = fresh.prefill(hist)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    assert dec.continue_with([[1, 2]]) is not None and dec.prefilled == [2]   # another row count: a new request
    with pytest.raises(ValueError, match="cache overflow"):
        dec.continue_with([[1, 2]], new_tokens=39)


def test_grow_keeps_every_row():
    """grow() reallocates larger buffers with the rows as they were: decoding on equals a core that was
    large from the start, bit for bit on the reference."""
    model, sched = _model(), D3Schedule(6, **SCHED)
    small = Decoder(model, sched, max_batch=2, max_seq_len=12, backend="reference")
    big = Decoder(model, sched, max_batch=3, max_seq_len=40, backend="reference")
    for dec in (small, big):
        dec.prefill([[5, 6, 7], [8, 9, 10, 11]])
        dec.decode(4)
    assert small.core.grow(max_seq_len=40, max_batch=3) and not small.core.grow(max_seq_len=20)
    assert small.cache.max_seq_len == 40 and small.cache.max_batch == 3
    assert small.history == big.history
    a, b = small.decode(10), big.decode(10)
    assert torch.equal(a, b) and torch.equal(small.core.logits[:2], big.core.logits[:2])


def test_plan_keys_and_launches():
    """A uniform plan launches "project" writes only at the first layer of each skipped run; rows at
    different steps launch at a superset that depends on the union alone; the key names all of it."""
    sched = D3Schedule(8, alpha=0.7, start=0.25, tail=1)
    i = next(i for i in range(1, 50) if 0 < sched.num_kept(i) < 8 and sched.num_kept(i + 3) < sched.num_kept(i))
    kept = sched.kept_layers(i)
    uni = engine.plan(sched, [i, i], "project")
    starts = [l for l in range(8) if l not in kept and (l == 0 or l - 1 in kept)]
    assert sorted(uni.project) == starts and uni.key == (kept, tuple(starts), False)
    mixed = engine.plan(sched, [i, i + 3], "project")
    again = engine.plan(sched, [i + 3, i], "project")
    assert set(mixed.project) > set(starts) and mixed.key == again.key and mixed.kept == kept
    assert engine.plan(sched, [0, 0], "copy").copy is None          # nobody skips: no copy launch
    assert engine.plan(sched, [i, None], "copy").key == (kept, (), True)


def test_workspaces_are_per_state():
    """Kernel scratch comes from the active workspace: two workspaces never share a buffer, and the default
    is back after a `with`."""
    from d3kernels import workspace
    a, b = workspace.Workspace(), workspace.Workspace()
    with a:
        ta = workspace.active().tensor("q", (4, 8), "cpu")
        with b:
            tb = workspace.active().tensor("q", (4, 8), "cpu")
        assert workspace.active() is a and workspace.active().tensor("q", (4, 8), "cpu") is ta
    assert workspace.active() is workspace.DEFAULT and ta.data_ptr() != tb.data_ptr()


def test_two_decoders_keep_their_own_scratch():
    """Two decoders on the Triton backend (interpreted on a CPU) fill their own workspaces and leave the
    process default alone, so they could run on two streams at once (the GPU test runs them so)."""
    from d3kernels import backends, workspace
    reason = backends.why_not("triton", "cpu", torch.float32, 16)
    if reason:
        pytest.skip(f"triton: {reason}")
    model = tiny_model(L=2, d=32, H=2, H_kv=1, D=16, F=48, V=64, seed=3)
    before = dict(workspace.DEFAULT.buffers)
    decs = [Decoder(model, D3Schedule(2, alpha=1.0), max_seq_len=16, backend="triton") for _ in range(2)]
    for dec in decs:
        dec.prefill([[1, 2, 3]])
        dec.step([4])
    mine = [{t.data_ptr() for t in d.core.workspace.buffers.values() if isinstance(t, torch.Tensor)} for d in decs]
    assert mine[0] and mine[1] and not mine[0] & mine[1]
    assert workspace.DEFAULT.buffers == before


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_two_decoders_on_two_streams(backend):
    """Two decoders stepping at once on two CUDA streams give the tokens each gives alone."""
    model = tiny_model(L=4, d=256, H=4, H_kv=2, D=64, F=512, V=211, dtype=torch.bfloat16, device="cuda")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    alone = []
    for p in prompts:
        dec = Decoder(model, D3Schedule(4, alpha=0.9, start=0.25), max_seq_len=64, backend=backend)
        dec.prefill([p])
        alone.append(dec.decode(32).cpu())
    decs = [Decoder(model, D3Schedule(4, alpha=0.9, start=0.25), max_seq_len=64, backend=backend) for _ in prompts]
    streams = [torch.cuda.Stream() for _ in prompts]
    outs = [None, None]
    for k, (dec, p, s) in enumerate(zip(decs, prompts, streams)):
        with torch.cuda.stream(s):
            dec.prefill([p])
    for k, (dec, s) in enumerate(zip(decs, streams)):
        with torch.cuda.stream(s):
            outs[k] = dec.decode(32)
    torch.cuda.synchronize()
    for k in range(2):
        assert torch.equal(outs[k].cpu(), alone[k]), k
