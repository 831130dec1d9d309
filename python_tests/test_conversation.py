"""Conversations that continue in the same cache: Decoder.generate(..., continue_=True) and d3kernels.Chat.

The continued prefill computes only the new tokens. At each layer they attend to the earlier positions
that layer holds: with fill "mask" the positions the layer skipped under D3 are left out, with "project"
and "copy" every position is there. The oracle below recomputes a whole conversation from scratch, one
position at a time in float64, from the depth each position ran at, with its own implementation of the
three fill rules; the decoder's logits must match it at every continued and decoded position.
"""
import pytest
import torch

from helpers import tiny_model

from d3kernels import D3Schedule, Decoder
from d3kernels.reference.ops import apply_rope

ATOL = 2e-4     # fp32 decoder against the float64 oracle, logits of magnitude ~1-5


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def oracle(model, seq, fill):
    """Logits [len(seq), V] (float64) of one row's conversation recomputed from scratch.
    seq: [(token, kept layers)] per position; a prompt token runs every layer."""
    cfg, w = model.config, model.weights
    L, H, H_kv, D, F, eps = cfg.num_layers, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate, cfg.eps
    f = lambda t: None if t is None else t.double()  # noqa: E731
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    N = len(seq)
    K = torch.zeros(L, N, H_kv, D, dtype=torch.float64)
    V = torch.zeros(L, N, H_kv, D, dtype=torch.float64)
    valid = torch.zeros(L, N, dtype=torch.bool)
    out = []

    def kv(l, x, p):
        qkv = _rms(x, f(w.attn_norm[l]), eps) @ f(w.wqkv[l]).t()
        if w.bqkv is not None:
            qkv = qkv + f(w.bqkv[l])
        ang = p * inv
        cos, sin = ang.cos(), ang.sin()
        q = apply_rope(qkv[: H * D].view(H, D), cos, sin)
        k = apply_rope(qkv[H * D:(H + H_kv) * D].view(H_kv, D), cos, sin)
        return q, k, qkv[(H + H_kv) * D:].view(H_kv, D)

    for p, (tok, kept) in enumerate(seq):
        h = f(w.embed[tok])
        for l in range(L):
            if l not in kept:
                if fill == "project":            # skipped layers pass h through: it enters this layer's run
                    _, K[l, p], V[l, p] = kv(l, h, p)
                    valid[l, p] = True
                elif fill == "copy":
                    src = max((j for j in kept if j < l), default=None)
                    if src is not None:
                        K[l, p], V[l, p], valid[l, p] = K[src, p], V[src, p], valid[src, p]
                continue
            q, K[l, p], V[l, p] = kv(l, h, p)
            valid[l, p] = True
            ks, vs = K[l, : p + 1][valid[l, : p + 1]], V[l, : p + 1][valid[l, : p + 1]]   # [P, H_kv, D]
            g = H // H_kv
            s = torch.einsum("gjd,pgd->gjp", q.view(H_kv, g, D), ks) / D ** 0.5
            o = torch.einsum("gjp,pgd->gjd", s.softmax(-1), vs).reshape(H * D)
            h = h + o @ f(w.wo[l]).t()
            gu = _rms(h, f(w.mlp_norm[l]), eps) @ f(w.w_gate_up[l]).t()
            h = h + (torch.nn.functional.silu(gu[:F]) * gu[F:]) @ f(w.w_down[l]).t()
        out.append(_rms(h, f(w.final_norm), eps) @ f(w.lm_head).t())
    return torch.stack(out)


def _stream_with_logits(dec, prompts, n, continue_):
    """stream() one turn; returns (tokens [B, n], kept sets, the logits each step's tokens came from)."""
    logits = []
    for _ in dec.stream(prompts, max_new_tokens=n, ignore_eos=True, continue_=continue_):
        logits.append(dec.core.logits[: len(prompts)].double().clone())   # the static buffer they were sampled from
    g = dec.last
    return g.tokens, g.layers, logits


@pytest.mark.parametrize("fill", ["mask", "project", "copy"])
@pytest.mark.parametrize("order", ["bottom", "top"])
def test_continued_conversation_matches_oracle(fill, order):
    """Three turns under D3, two rows: every turn's prefill logits and decode logits equal the oracle's over
    the whole conversation so far, and the tokens are their argmax."""
    model = tiny_model(L=6, d=64, H=4, H_kv=2, D=16, F=96, V=101, qkv_bias=fill == "project", seed=4)
    sched = D3Schedule(6, alpha=0.8, start=0.2, tail=1, skip_order=order)
    dec = Decoder(model, sched, max_batch=2, max_seq_len=96, backend="reference", fill=fill)
    turns = [[[5, 17, 42, 99, 3], [11, 20, 8]], [[7, 8, 9], [60, 61]], [[33, 34, 35, 36], [2]]]
    full = tuple(range(6))
    seqs = [[], []]                                   # per row: (token, kept layers) of every position
    for t, prompts in enumerate(turns):
        conv = dec.conversation
        feed = prompts
        if t > 0:                                     # the last generated token is fed first
            feed = [[conv[b][-1]] + prompts[b] for b in range(2)]
            assert [len(s) for s in seqs] == [len(c) - 1 for c in conv]
        toks, layers, logits = _stream_with_logits(dec, prompts, 7, continue_=t > 0)
        assert min(len(k) for k in layers) < 6, "the schedule must skip layers"
        assert layers[0] == full
        for b in range(2):
            start = len(seqs[b]) + len(feed[b]) - 1       # the position whose logits gave T_0
            seqs[b] += [(tok, full) for tok in feed[b]]
            seqs[b] += [(tok, layers[j + 1]) for j, tok in enumerate(toks[b, :-1].tolist())]
            want = oracle(model, seqs[b], fill)
            for j in range(toks.shape[1]):
                torch.testing.assert_close(logits[j][b], want[start + j], atol=ATOL, rtol=0,
                                           msg=lambda m: f"turn {t}, row {b}, token {j}: {m}")
                assert int(toks[b, j]) == int(logits[j][b].argmax())


def test_full_depth_continuation_equals_one_long_prompt():
    """At alpha = 1 a continued conversation gives the tokens of a fresh request over the whole transcript."""
    model = tiny_model(L=4, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=5)
    dec = Decoder(model, D3Schedule(4, alpha=1.0), max_batch=1, max_seq_len=64, backend="reference")
    g1 = dec.generate([[5, 17, 42, 99]], max_new_tokens=6, ignore_eos=True)
    g2 = dec.generate([[7, 8, 9]], max_new_tokens=6, ignore_eos=True, continue_=True)
    transcript = [5, 17, 42, 99] + g1.tokens[0].tolist() + [7, 8, 9]
    assert dec.conversation == [transcript + g2.tokens[0].tolist()]
    fresh = Decoder(model, D3Schedule(4, alpha=1.0), max_batch=1, max_seq_len=64, backend="reference")
    g = fresh.generate([transcript], max_new_tokens=6, ignore_eos=True)
    assert g2.tokens.tolist() == g.tokens.tolist()
    assert g2.layers[0] == tuple(range(4))


def test_finished_row_is_cut_back_to_its_conversation():
    """A row that stopped at EOS while the other went on was fed tokens past its end; the next turn
    continues right after its EOS (those positions are masked and overwritten)."""
    model = tiny_model(L=4, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=6)
    sched = D3Schedule(4, alpha=1.0)
    probe = Decoder(model, sched, max_batch=2, max_seq_len=64, backend="reference")
    prompts = [[5, 17, 42], [11, 20, 8, 9]]
    free = probe.generate(prompts, max_new_tokens=8, ignore_eos=True).tokens
    eos = int(free[0, 2])
    if eos in free[1].tolist() or eos in free[0, :2].tolist():
        pytest.skip("the probe token also occurs elsewhere; pick another seed")
    model.config.eos_token_ids = [eos]
    dec = Decoder(model, sched, max_batch=2, max_seq_len=64, backend="reference")
    g = dec.generate(prompts, max_new_tokens=8)
    assert g.finished == ["eos", "length"]
    assert dec.conversation[0] == prompts[0] + free[0, :3].tolist()
    g2 = dec.generate([[1, 2], [3]], max_new_tokens=4, ignore_eos=True, continue_=True)
    for b in range(2):
        fresh = Decoder(model, sched, max_batch=1, max_seq_len=64, backend="reference")
        conv_b = dec.conversation[b][: -4]
        want = fresh.generate([conv_b], max_new_tokens=4, ignore_eos=True).tokens[0]
        assert g2.tokens[b].tolist() == want.tolist(), b


def test_continue_errors_change_nothing():
    model = tiny_model(L=4, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=7)
    dec = Decoder(model, D3Schedule(4, alpha=0.8), max_batch=2, max_seq_len=24, backend="reference")
    with pytest.raises(RuntimeError, match="continue"):
        dec.generate([[1, 2]], max_new_tokens=2, continue_=True)
    dec.generate([[1, 2, 3], [4]], max_new_tokens=4, ignore_eos=True)
    before = dec.snapshot()
    conv = dec.conversation
    with pytest.raises(ValueError, match="2 rows"):
        dec.generate([[5]], max_new_tokens=2, continue_=True)
    with pytest.raises(ValueError, match="cache overflow"):
        dec.generate([[5] * 10, [6]], max_new_tokens=10, continue_=True)
    after = dec.snapshot()
    for k in ("k", "v", "kv_valid"):
        assert torch.equal(before[k], after[k]), k
    assert before["lengths"] == after["lengths"]
    assert dec.conversation == conv
    dec.step([1, 1])                                  # driving steps by hand ends the kept conversation
    with pytest.raises(RuntimeError, match="prefill\\(ids, continue_=True\\)"):
        dec.generate([[5], [6]], max_new_tokens=2, continue_=True)
    logits = dec.prefill([[5], [6]], continue_=True)  # the low-level path appends after what the cache holds
    assert logits.shape == (2, 101) and dec.lengths == [3 + 3 + 1 + 1, 1 + 3 + 1 + 1]   # prompt + 3 fed + step + 1


@pytest.mark.slow
def test_chat_prefills_only_the_new_turn():
    """d3kernels.Chat on the embedded model: the second turn prefills only its new tokens, and at full depth
    its reply equals a fresh request over the whole templated conversation."""
    import d3kernels
    from d3kernels.generate import template_ids
    try:
        model = d3kernels.load_model()
    except FileNotFoundError as e:
        pytest.skip(f"embedded model missing: {e}")
    chat = d3kernels.Chat(model, D3Schedule(model.config.num_layers, alpha=1.0), max_seq_len=256)
    chat.send("What is the capital of France?", max_new_tokens=8)
    second = chat.send("And of Italy?", max_new_tokens=8)
    ids = template_ids(model.tokenizer, chat.messages[:-1])
    assert chat.prefilled[1] < len(ids) // 2, chat.prefilled
    fresh = Decoder(model, D3Schedule(model.config.num_layers, alpha=1.0), max_seq_len=256)
    g = fresh.generate([ids], max_new_tokens=8)
    assert second == model.tokenizer.decode([t for t in g.tokens[0].tolist() if t >= 0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="non-empty"):
        chat.send("")


def test_continued_prefill_with_holes_on_the_cpu_backend_with_packed_weights():
    """The cpu backend on packed weights (its GEMM for the prefill's projections, the blocked causal attention
    over kv_valid with the holes D3's "mask" fill leaves): every continued turn's prefill and decode logits
    equal the float64 oracle's on the dequantized weights, within the 16-bit activation rounding."""
    import dataclasses
    from d3kernels import cpu, quant
    from d3kernels.model import Model
    if cpu.available() is not None:
        pytest.skip(f"the cpu backend is not available: {cpu.available()}")
    base = tiny_model(L=6, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=8)
    w = base.weights
    packed = Model(base.config, dataclasses.replace(
        w, wqkv=quant.quantize(w.wqkv, "q8_0"), wo=quant.quantize(w.wo, "q5_0"),
        w_gate_up=quant.quantize(w.w_gate_up, "q4_1"), w_down=quant.quantize(w.w_down, "q8_0")))
    assert packed.weights.packed
    exact = packed.dequantized()
    sched = D3Schedule(6, alpha=0.8, start=0.2, tail=1)
    dec = Decoder(packed, sched, max_batch=2, max_seq_len=96, backend="cpu", fill="mask")
    assert dec.backend == "cpu"
    seqs = [[], []]
    for t, prompts in enumerate([[[5, 17, 42, 99, 3, 64, 70, 12, 9], [11, 20, 8]], [[7, 8, 9], [60, 61, 62, 63]]]):
        conv = dec.conversation
        feed = prompts if t == 0 else [[conv[b][-1]] + prompts[b] for b in range(2)]
        toks, layers, logits = _stream_with_logits(dec, prompts, 6, continue_=t > 0)
        assert min(len(k) for k in layers) < 6, "the schedule must skip layers (holes in the cache)"
        for b in range(2):
            start = len(seqs[b]) + len(feed[b]) - 1
            seqs[b] += [(tok, tuple(range(6))) for tok in feed[b]]
            seqs[b] += [(tok, layers[j + 1]) for j, tok in enumerate(toks[b, :-1].tolist())]
            want = oracle(exact, seqs[b], "mask")
            for j in range(toks.shape[1]):
                torch.testing.assert_close(logits[j][b], want[start + j], atol=2e-3, rtol=0,
                                           msg=lambda m: f"turn {t}, row {b}, token {j}: {m}")
