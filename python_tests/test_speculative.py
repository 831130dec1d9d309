"""Lossless D3, greedy (d3kernels/speculative.py): D3-depth drafts verified at full depth give exactly
full-depth greedy decoding's tokens. float32 on the reference: exact on the test models (their margins are
far above rounding)."""
import pytest
import torch

from helpers import tiny_model

from d3kernels import D3Schedule, Decoder
from d3kernels.model import Model
from d3kernels.step import StepCore

PROMPTS = [[5, 17, 42, 99, 3], [11, 20], [7, 8, 9]]


def _model():
    return tiny_model(L=6, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=11)


def _full_depth(model, prompts, n, S=96, eos=True):
    dec = Decoder(model, D3Schedule(6, alpha=1.0), max_batch=len(prompts), max_seq_len=S, backend="reference")
    return dec.generate(prompts, max_new_tokens=n, ignore_eos=not eos)


def _speculative(model, prompts, n, k, S=96, eos=True, **sched):
    sched = sched or dict(alpha=0.85, start=0.2, tail=1)
    dec = Decoder(model, D3Schedule(6, **sched), max_batch=len(prompts), max_seq_len=S, backend="reference")
    return dec.generate(prompts, max_new_tokens=n, ignore_eos=not eos, speculative=k)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("sched", [dict(alpha=0.85, start=0.2, tail=1), dict(alpha=0.6, start=0.0, tail=0)])
def test_greedy_speculative_equals_full_depth(k, sched):
    """Rows of different prompt lengths accept different counts each round; every token is full depth's."""
    model = _model()
    want = _full_depth(model, PROMPTS, 29, eos=False)
    g = _speculative(model, PROMPTS, 29, k, eos=False, **sched)
    assert torch.equal(g.tokens, want.tokens) and g.finished == ["length"] * 3
    s = g.speculation
    assert s["rounds"] >= 1 and 0 <= s["accepted"] <= s["drafted"] and s["verify_layer_passes"] > 0
    assert g.tokens.shape[1] == 29                     # the last round stopped at max_new_tokens


def _identity_flex_model(sched: D3Schedule):
    """_model() with every flex layer of `sched` an identity (wo and w_down zero: out = h), so skipping them
    changes nothing and full depth accepts every draft (the long accepted runs a real drafter rarely has)."""
    model = _model()
    with torch.no_grad():
        for l in sched.flex_layers:
            model.weights.wo[l].zero_()
            model.weights.w_down[l].zero_()
    return model


def test_eos_inside_an_accepted_run():
    """An EOS among the accepted drafts of a round ends its row there: the drafts accepted after it are
    not emitted. Drafts run 2 of 6 layers, but the skipped ones are identities, so every draft is
    accepted and the EOS (row 0's T_2) sits inside round 1's run of 5 accepted drafts."""
    sched = D3Schedule(6, alpha=0.6, start=0.2, tail=1)
    assert sched.kept_layers(1) == (0, 4, 5) and sched.kept_layers(2) == (0, 5)
    model = _identity_flex_model(sched)
    free = _full_depth(model, PROMPTS, 20, eos=False).tokens
    eos = int(free[0, 2])
    assert eos not in free[0, :2].tolist()                 # row 0's first EOS is T_2
    model.config.eos_token_ids = [eos]
    want = _full_depth(model, PROMPTS, 20)
    assert want.finished[0] == "eos" and int((want.tokens[0] >= 0).sum()) == 3
    dec = Decoder(model, sched, max_batch=3, max_seq_len=96, backend="reference")
    g = dec.generate(PROMPTS, max_new_tokens=20, speculative=5)
    s = g.speculation
    assert s["accepted"] == s["drafted"] > 0, s             # every draft accepted: round 1 emits T_1..T_6
    assert torch.equal(g.tokens, want.tokens) and g.finished == want.finished


def test_eos_and_a_full_cache():
    """A row stops at an EOS that comes as the full-depth token after a round's accepted drafts; a cache exactly as long as
    prompt + max_new_tokens is enough (the last rounds draft fewer)."""
    model = _model()
    free = _full_depth(model, PROMPTS, 20, eos=False).tokens
    eos = int(free[0, 6])
    model.config.eos_token_ids = [eos]
    want = _full_depth(model, PROMPTS, 20)
    for k in (2, 5):
        g = _speculative(model, PROMPTS, 20, k, alpha=0.95, start=0.5, tail=1)
        assert torch.equal(g.tokens, want.tokens) and g.finished == want.finished, k
    assert want.finished[0] == "eos"
    S = max(len(p) for p in PROMPTS) + 20
    model.config.eos_token_ids = []
    g = _speculative(model, PROMPTS, 20, 4, S=S)
    assert torch.equal(g.tokens, _full_depth(model, PROMPTS, 20, S=S).tokens)


def test_a_continued_conversation_equals_full_depth():
    """Lossless D3 leaves full-depth K/V at every accepted position, so the next turn (continue_=True, also
    speculative) gives full-depth decoding's continuation."""
    model = _model()
    full = Decoder(model, D3Schedule(6, alpha=1.0), max_batch=2, max_seq_len=96, backend="reference")
    spec = Decoder(model, D3Schedule(6, alpha=0.85, start=0.2, tail=1), max_batch=2, max_seq_len=96,
                   backend="reference")
    turns = [PROMPTS[:2], [[9, 10], [12]]]
    for t, prompts in enumerate(turns):
        want = full.generate(prompts, max_new_tokens=8, ignore_eos=True, continue_=t > 0)
        got = spec.generate(prompts, max_new_tokens=8, ignore_eos=True, continue_=t > 0, speculative=3)
        assert torch.equal(got.tokens, want.tokens), t
        assert spec.conversation == full.conversation


@pytest.mark.parametrize("bug", ["no K/V overwrite", "cut back one short"])
def test_a_planted_bug_is_caught(monkeypatch, bug):
    """The identity test fails when the verify pass does not overwrite the drafts' K/V (the cut-back before
    it is skipped) or when the cut-back after it keeps one rejected position."""
    model = _model()
    want = _full_depth(model, PROMPTS, 29, eos=False)
    real = StepCore.truncate
    calls = {"n": 0}

    def truncate(core, b, n):
        calls["n"] += 1
        if bug == "no K/V overwrite" and n < core.lengths[b]:
            return                                     # drafts stay; the verify pass appends after them
        if bug == "cut back one short" and n < core.lengths[b]:
            n += 1
        real(core, b, n)
    monkeypatch.setattr(StepCore, "truncate", truncate)
    g = _speculative(model, PROMPTS, 29, 3, S=256, eos=False)     # room for the stale positions
    assert calls["n"] > 0 and not torch.equal(g.tokens, want.tokens)


def test_bad_arguments():
    dec = Decoder(_model(), D3Schedule(6), max_seq_len=32, backend="reference")
    with pytest.raises(ValueError, match="k"):
        dec.generate([[1, 2]], max_new_tokens=4, speculative=0)
    with pytest.raises(ValueError, match="tokenizer"):
        dec.generate([[1, 2]], max_new_tokens=4, speculative=2, stop=["x"])
    with pytest.raises(ValueError, match="temperature"):
        dec.generate([[1, 2]], max_new_tokens=4, speculative=2, temperature=-1.0)
    with pytest.raises(ValueError, match="draft schedule"):
        dec.generate([[1, 2]], max_new_tokens=4, speculative=2, draft=D3Schedule(4))
    with pytest.raises(ValueError, match="cache overflow"):
        dec.generate([[1, 2]], max_new_tokens=40, speculative=2)


# --------------------------------------------------------------------------- sampling
def _chi2_pvalue(a: list, b: list, V: int) -> float:
    """Two-sample chi-square test of two token samples over V bins (bins with < 10 counts in all are
    pooled); the p-value."""
    ca, cb = torch.bincount(torch.tensor(a), minlength=V).double(), torch.bincount(torch.tensor(b), minlength=V).double()
    keep = (ca + cb) >= 10
    ca = torch.cat([ca[keep], ca[~keep].sum()[None]])
    cb = torch.cat([cb[keep], cb[~keep].sum()[None]])
    if ca[-1] + cb[-1] == 0:
        ca, cb = ca[:-1], cb[:-1]
    tot = ca + cb
    ea, eb = tot * ca.sum() / tot.sum(), tot * cb.sum() / tot.sum()
    x = float((((ca - ea) ** 2) / ea + ((cb - eb) ** 2) / eb).sum())
    df = len(tot) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2)))


def _samples(model, sched, n_calls: int, speculative=None, seed0=0) -> list:
    """Tokens 1 and 2 (after T_0) of 64 rows x n_calls seeded runs of one prompt at temperature 0.8."""
    dec = Decoder(model, sched, max_batch=64, max_seq_len=16, backend="reference")
    out = [], []
    for c in range(n_calls):
        g = dec.generate([[1, 2, 3]] * 64, max_new_tokens=3, ignore_eos=True, temperature=0.8, seed=seed0 + c,
                         speculative=speculative)
        for j in (0, 1):
            out[j].extend(g.tokens[:, j + 1].tolist())
    return out


def _sampling_pvalues(monkeypatch=None, break_correction=False) -> list:
    from d3kernels import speculative as spec
    model = tiny_model(L=6, d=64, H=4, H_kv=2, D=16, F=96, V=13, seed=21)
    if break_correction:                  # the planted fault: every draft accepted, no residual resampling
        monkeypatch.setattr(spec._Pick, "verify", lambda self, drafts, q, logits:
                            (len(drafts), self.draw(self.probs(logits).cpu()[len(drafts)])))
    shallow = D3Schedule(6, alpha=0.3, start=0.0, tail=1)          # drafts run one layer of six
    full = _samples(model, D3Schedule(6, alpha=1.0), 8, seed0=1000)
    spec_ = _samples(model, shallow, 8, speculative=3)
    return [_chi2_pvalue(full[j], spec_[j], 13) for j in (0, 1)]


def test_speculative_sampling_matches_full_depth_sampling():
    """Over 512 seeded runs, tokens 1 and 2 of speculative sampling (drafts from one layer of six) are
    distributed as full-depth sampling's: a two-sample chi-square test at p > 0.001."""
    assert min(_sampling_pvalues()) > 1e-3


def test_sampling_without_the_correction_is_caught(monkeypatch):
    """The same test rejects the planted fault (drafts always accepted: the draft's distribution)."""
    assert min(_sampling_pvalues(monkeypatch, break_correction=True)) < 1e-4


# --------------------------------------------------------------------------- 16-bit, every backend
@pytest.mark.parametrize("backend, dtype", [("reference", torch.bfloat16), ("cuda-emu", torch.bfloat16),
                                            ("cuda-emu", torch.float16), ("triton", torch.float16)], ids=str)
def test_16bit_speculative_follows_the_float64_oracle(backend, dtype):
    """In 16 bits the verify pass and a decode step may round apart, so each speculative token is compared
    with the float64 full-depth oracle fed the same tokens: it must be the oracle's argmax wherever the
    oracle's top-2 margin is clear, above 4 bfloat16 rounding units (2^-8) of the largest logit (a closer
    call may go either way)."""
    from d3kernels import backends
    reason = backends.why_not(backend, "cpu", dtype, 64)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    model = tiny_model(L=4, d=128, H=4, H_kv=2, D=64, F=160, V=211, dtype=dtype, seed=4)
    o64 = Model(model.config, model.weights.to(torch.float64), None, source=model.source)
    prompts, n = [[5, 17, 42, 99, 3], [11, 20, 8]], 10
    dec = Decoder(model, D3Schedule(4, alpha=0.8, start=0.25, tail=1), max_batch=2, max_seq_len=32, backend=backend)
    g = dec.generate(prompts, max_new_tokens=n, ignore_eos=True, speculative=3)
    assert g.tokens.shape == (2, n) and g.speculation["rounds"] >= 1
    oracle = Decoder(o64, D3Schedule(4, alpha=1.0), max_batch=2, max_seq_len=32, backend="reference")
    logits = oracle.prefill(prompts)
    clear_steps = 0
    for i in range(n):
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 4 * 2 ** -8 * logits.abs().max()
        assert torch.equal(g.tokens[clear, i], logits.argmax(-1)[clear]), (i, g.tokens[:, i], logits.argmax(-1))
        clear_steps += int(clear.sum())
        logits = oracle.step(g.tokens[:, i])
    assert clear_steps >= n, "the test must see clear margins"


@pytest.mark.slow
def test_text_api_and_embedded_model():
    """d3kernels.generate(..., speculative=k) on the embedded model gives full depth's text."""
    import d3kernels
    try:
        model = d3kernels.load_model()
    except FileNotFoundError as e:
        pytest.skip(f"embedded model missing: {e}")
    kw = dict(model=model, max_new_tokens=16, backend="reference")
    full = d3kernels.generate("Name three rivers.", alpha=1.0, **kw)
    assert d3kernels.generate("Name three rivers.", alpha=0.99, speculative=2, **kw) == full
