"""KV cache depth mask, fill policies, reference attention masking, and input rejection."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from d3kernels import D3Schedule, Decoder, load_model  # noqa: E402
from d3kernels import ops  # noqa: E402
from d3kernels.reference import apply_rope, rms_norm  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=256)
    return load_model(transformers.LlamaForCausalLM(cfg), device="cpu", dtype=torch.float32)


SCHED = dict(alpha=0.8, start=0.34, tail=1)      # L=6: head core 2, flex 2..4, tail 5


def _run(model, fill, n=6, prompts=([3, 4, 5, 6], [7, 8])):
    sched = D3Schedule(6, **SCHED)
    dec = Decoder(model, sched, max_batch=2, max_seq_len=32, fill=fill)
    g = dec.generate([list(p) for p in prompts], max_new_tokens=n, ignore_eos=True)
    return dec, g


def test_mask_fill_marks_exactly_the_skipped_layers(model):
    dec, g = _run(model, "mask")
    valid = dec.cache.kv_valid
    lens = [4, 2]
    for b, n in enumerate(lens):
        assert valid[:, b, :n].all(), "prompt positions are valid at every layer"
        # step i (>= 1) feeds T_{i-1} at position n + i - 1 and runs kept_layers(i)
        for i in range(1, len(g.layers)):
            p = n + i - 1
            expect = torch.zeros(6, dtype=torch.uint8)
            expect[list(g.layers[i])] = 1
            assert torch.equal(valid[:, b, p], expect), (b, i)
        assert not valid[:, b, n + len(g.layers) - 1:].any(), "nothing written past the last fed token"
    assert any(len(k) < 6 for k in g.layers)


def test_project_fill_writes_the_formula(model):
    dec, g = _run(model, "project")
    w, cfg, c = model.weights, model.config, dec.cache
    H, Hkv, D = cfg.heads, cfg.kv_heads, cfg.head_dim
    # recompute: replay the same steps with the same tokens, capturing the state entering each skipped run
    sched = D3Schedule(6, **SCHED)
    ref = Decoder(model, sched, max_batch=2, max_seq_len=32, fill="mask")
    ref.prefill([[3, 4, 5, 6], [7, 8]])
    toks = g.tokens
    for i in range(1, len(g.layers)):
        kept = g.layers[i]
        h_enter = {}
        ref.ops = _Spy(dec.ops, h_enter)
        ref.step(toks[:, i - 1].tolist())
        skipped = [l for l in range(6) if l not in kept]
        for b, n in enumerate([4, 2]):
            p = n + i - 1
            for l in skipped:
                # the state entering the first skipped layer = the output of the last kept layer below it
                below = [j for j, lay in enumerate(kept) if lay < l]
                src = h_enter["mlp_out"][below[-1]][b] if below else h_enter["embed"][b]
                x = rms_norm(src, w.attn_norm[l], cfg.eps)
                kv = x @ w.wqkv[l, H * D:].float().t()
                k = apply_rope(kv[: Hkv * D].view(Hkv, D), dec.core.rope_cos[p], dec.core.rope_sin[p])
                torch.testing.assert_close(c.k[l, b, :, p], k, atol=1e-5, rtol=0)
                torch.testing.assert_close(c.v[l, b, :, p], kv[Hkv * D:].view(Hkv, D), atol=1e-5, rtol=0)
                assert c.kv_valid[l, b, p] == 1


class _Spy:
    """Wraps a backend module, recording the embedded input and each mlp_block output of a step."""

    def __init__(self, inner, record):
        self.inner, self.record = inner, record
        record.clear()
        record["mlp_out"] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def attn_block(self, out, h, *a):
        self.record.setdefault("embed", h.clone())
        return self.inner.attn_block(out, h, *a)

    def mlp_block(self, out, *a):
        self.inner.mlp_block(out, *a)
        self.record["mlp_out"].append(out.clone())


def test_copy_fill_copies_from_the_nearest_executed_layer(model):
    dec, g = _run(model, "copy")
    c = dec.cache
    for i in range(1, len(g.layers)):
        kept = g.layers[i]
        for b, n in enumerate([4, 2]):
            p = n + i - 1
            for l in range(6):
                if l in kept:
                    continue
                src = max(j for j in kept if j < l)
                assert torch.equal(c.k[l, b, :, p], c.k[src, b, :, p])
                assert torch.equal(c.v[l, b, :, p], c.v[src, b, :, p])
                assert c.kv_valid[l, b, p] == 1


def test_fill_policies_agree_within_one_sequence(model):
    # nested schedules never read a skipped entry in a single sequence, so every policy gives the same tokens
    toks = [_run(model, f, n=10)[1].tokens for f in ("mask", "project", "copy")]
    assert torch.equal(toks[0], toks[1]) and torch.equal(toks[0], toks[2])


def _attn_inputs(B=2, H=4, Hkv=2, D=16, d=32, S=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cos, sin = torch.randn(S, D // 2, generator=g), torch.randn(S, D // 2, generator=g)
    return dict(h=r(B, d), attn_norm=1 + 0.1 * r(d), wqkv=0.2 * r((H + 2 * Hkv) * D, d), bqkv=None,
                wo=0.2 * r(d, H * D), k_cache=r(B, Hkv, S, D), v_cache=r(B, Hkv, S, D),
                kv_valid=torch.ones(B, S, dtype=torch.uint8), pos=torch.tensor([9, 17], dtype=torch.int32),
                rope_cos=cos, rope_sin=sin, row_active=torch.ones(B, dtype=torch.uint8), eps=1e-5)


def test_reference_attention_ignores_invalid_positions():
    a = _attn_inputs()
    holes = a["kv_valid"].clone()
    holes[0, [1, 4, 5]] = 0
    holes[1, [0, 16]] = 0
    # garbage in the holes must not matter: run with two different garbage fills
    outs = []
    for fillval in (1e3, -7.0):
        x = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        x["kv_valid"] = holes.clone()
        for b, ps in ((0, [1, 4, 5]), (1, [0, 16])):
            x["k_cache"][b, :, ps] = fillval
            x["v_cache"][b, :, ps] = fillval
        out = torch.empty_like(x["h"])
        ops.attn_block(out, **x, backend="reference")
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    # and it equals attention computed directly over only the valid positions
    x = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    x["kv_valid"] = holes.clone()
    out = torch.empty_like(x["h"])
    ops.attn_block(out, **x, backend="reference")
    H, Hkv, D = 4, 2, 16
    qkv = rms_norm(a["h"], a["attn_norm"], 1e-5) @ a["wqkv"].t()
    for b in range(2):
        p = int(a["pos"][b])
        q = apply_rope(qkv[b, : H * D].view(H, D), a["rope_cos"][p], a["rope_sin"][p])
        keep = [j for j in range(p + 1) if x["kv_valid"][b, j]]
        assert p in keep
        K = x["k_cache"][b][:, keep].repeat_interleave(H // Hkv, 0)
        V = x["v_cache"][b][:, keep].repeat_interleave(H // Hkv, 0)
        o = torch.softmax(torch.einsum("hd,hpd->hp", q, K) / D ** 0.5, -1)
        o = torch.einsum("hp,hpd->hd", o, V).reshape(-1)
        torch.testing.assert_close(out[b], a["h"][b] + o @ a["wo"].t(), atol=1e-5, rtol=1e-5)


def test_inactive_rows_pass_through():
    a = _attn_inputs()
    a["row_active"] = torch.tensor([0, 1], dtype=torch.uint8)
    k0 = a["k_cache"].clone()
    out = torch.full_like(a["h"], float("nan"))
    ops.attn_block(out, **a, backend="reference")
    assert torch.equal(out[0], a["h"][0]) and torch.equal(a["k_cache"][0], k0[0])
    assert not torch.equal(out[1], a["h"][1])


# ------------------------------------------------------------------ rejected input leaves the decoder usable

def test_bad_input_is_rejected_before_state_changes(model):
    dec = Decoder(model, D3Schedule(6, **SCHED), max_batch=2, max_seq_len=16)
    good = dec.generate([[1, 2, 3]], max_new_tokens=5, ignore_eos=True).tokens
    before = dec.cache.kv_valid.clone()
    bad_cases = [
        (([[]],), "empty"),
        (([],), "empty"),
        (([[1, 2, 97]],), r"outside \[0, 97\)"),
        (([[1, -1]],), "outside"),
        (([[1, 2, 3]] * 3,), "max_batch"),
        (([[1] * 10],), "cache overflow"),          # 10 + 8 new tokens > 16
        ((torch.tensor([[1, 2]], device="meta"),), "device"),
        ((torch.tensor([[1.0, 2.0]]),), "integer"),
    ]
    for args, match in bad_cases:
        with pytest.raises((ValueError, TypeError), match=match):
            dec.generate(*args, max_new_tokens=8)
        assert torch.equal(dec.cache.kv_valid, before), f"state changed by a rejected call ({match})"
    for kw, match in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
                      ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k")]:
        with pytest.raises(ValueError, match=match):
            dec.generate([[1, 2, 3]], **{"max_new_tokens": 4, **kw})
    assert torch.equal(dec.generate([[1, 2, 3]], max_new_tokens=5, ignore_eos=True).tokens, good)


def test_step_errors(model):
    dec = Decoder(model, D3Schedule(6, alpha=1.0), max_batch=1, max_seq_len=5)
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step([1])
    dec.prefill([[1, 2, 3]])
    with pytest.raises(ValueError, match="outside"):
        dec.step([500])
    with pytest.raises(ValueError, match="expected 1 tokens"):
        dec.step([1, 2])
    dec.step([4])
    dec.step([5])                      # positions 3 and 4 fill the cache
    with pytest.raises(ValueError, match="cache overflow"):
        dec.step([6])
    assert dec.cache.kv_valid[:, 0].sum() == 5 * 6


def test_decoder_arguments(model):
    with pytest.raises(ValueError, match="fill"):
        Decoder(model, fill="zero")
    with pytest.raises(ValueError, match="schedule is for 30 layers"):
        Decoder(model, D3Schedule(30))
    with pytest.raises(ValueError, match="backend must be one of"):
        Decoder(model, backend="tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        Decoder(model, backend="cuda")


def test_op_shape_errors():
    a = _attn_inputs()
    out = torch.empty(2, 31)
    with pytest.raises(ValueError, match=r"expected out of shape \(2, 32\), got \(2, 31\)"):
        ops.attn_block(out, **a)
    a["pos"] = a["pos"].long()
    with pytest.raises(TypeError, match="expected pos of dtype torch.int32"):
        ops.attn_block(torch.empty(2, 32), **a)


@pytest.mark.parametrize("fill", ["project", "copy"])
def test_fill_writes_nothing_for_unused_rows(model, fill):
    dec = Decoder(model, D3Schedule(6, **SCHED), max_batch=2, max_seq_len=32, fill=fill)
    dec.generate([[3, 4, 5]], max_new_tokens=6, ignore_eos=True)       # row 1 is unused
    assert not dec.cache.kv_valid[:, 1].any()
    dec.generate([[3, 4, 5], [6, 7]], max_new_tokens=6, ignore_eos=True)
    dec.generate([[3, 4, 5]], max_new_tokens=6, ignore_eos=True)       # flags cached above must follow
    assert not dec.cache.kv_valid[:, 1].any()


def test_snapshot_restore_replays_exactly(model):
    dec = Decoder(model, D3Schedule(6, **SCHED), max_batch=2, max_seq_len=32)
    dec.prefill([[3, 4, 5, 6], [7, 8]])
    state = dec.snapshot()
    first = [dec.step([9, 10]).clone() for _ in range(4)]
    dec.set_schedule(D3Schedule(6, alpha=1.0))
    dec.step([1, 2])
    dec.restore(state)
    dec.set_schedule(D3Schedule(6, **SCHED))
    again = [dec.step([9, 10]).clone() for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="schedule is for 30 layers"):
        dec.set_schedule(D3Schedule(30))
