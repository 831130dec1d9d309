"""D3 inside Hugging Face generate(): d3kernels.hf.generate as `custom_generate=` and the custom_generate/
folder, against plain `model.generate()` and against d3kernels' own Decoder (fp32, CPU, reference backend).

At alpha=1 the D3 loop must be plain generate: the same greedy tokens, the same stops and processors,
and the same sampling distribution. At alpha<1 it must be Decoder.generate with the same settings.
"""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import d3kernels.hf as d3hf
from d3kernels.step import StepCore  # noqa: E402
from d3kernels import D3Schedule, Decoder, load_model  # noqa: E402
from helpers import tiny_hf_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [5, 17, 42, 99, 3, 120, 7]
BATCH = [[11, 200, 8], [5, 17, 42, 99, 3, 120, 7], [60, 61, 62, 63, 64]]
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
FULL = dict(custom_generate=d3hf.generate, d3_alpha=1.0, d3_backend="reference")
# sampling test: total variation distance between empirical first-token frequencies and the exact
# distribution (8 tokens after top-k). For N=1000 draws from that distribution, 5000 simulations gave a
# mean of 0.027, a 99.9th percentile of 0.062 and a maximum of 0.071; the bound is 0.08. The seeds are
# fixed, so the test is deterministic; it also checks that the bound tells the wanted temperature from 1.
N_DRAWS_PER_SEED, SEEDS, TV_MAX = 500, 2, 0.08


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def hf(request):
    return tiny_hf_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


def _padded(rows, side="left", pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


# --------------------------------------------------------------------------- alpha = 1: plain generate

def test_greedy_matches_plain_generate(hf):
    ids = torch.tensor([PROMPT])
    plain = hf.generate(ids, max_new_tokens=20, **GREEDY)
    ours = hf.generate(ids, max_new_tokens=20, **GREEDY, **FULL)
    assert torch.equal(ours, plain)


def test_left_padded_batch_matches_plain_generate(hf):
    ids, mask = _padded(BATCH, "left")
    plain = hf.generate(ids, attention_mask=mask, max_new_tokens=16, **GREEDY)
    ours = hf.generate(ids, attention_mask=mask, max_new_tokens=16, **GREEDY, **FULL)
    assert ours.shape == plain.shape == (3, ids.shape[1] + 16)
    assert torch.equal(ours, plain)


def test_right_padding_is_stripped_per_row(llama):
    """Right padding is mapped to per-row positions: each row continues as if alone (plain generate
    would continue after the pads)."""
    ids, mask = _padded(BATCH, "right")
    ours = llama.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY, **FULL)
    assert torch.equal(ours[:, : ids.shape[1]], ids)          # the input layout is kept, pads included
    for b, r in enumerate(BATCH):
        alone = llama.generate(torch.tensor([r]), max_new_tokens=8, **GREEDY)
        assert ours[b, ids.shape[1]:].tolist() == alone[0, len(r):].tolist(), b


def test_eos_and_max_length_like_plain_generate(llama):
    ids, mask = _padded(BATCH, "left")
    free = llama.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY)[:, ids.shape[1]:]
    eos = [int(free[0, 3]), int(free[2, 4])]                 # rows stop at different steps, one never
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=0)
    for length in (dict(max_new_tokens=12), dict(max_length=ids.shape[1] + 9)):
        plain = llama.generate(ids, **kw, **length)
        ours = llama.generate(ids, **kw, **length, **FULL)
        assert torch.equal(ours, plain), length


@pytest.mark.parametrize("processors", ["repetition_penalty", "bad_words", "min_new_tokens"])
def test_logits_processors_like_plain_generate(llama, processors):
    ids = torch.tensor([PROMPT])
    free = llama.generate(ids, max_new_tokens=14, **GREEDY)[0, len(PROMPT):].tolist()
    eos = free[10]
    assert eos not in free[:10]
    base = dict(do_sample=False, pad_token_id=0, max_new_tokens=14, eos_token_id=eos)
    extra = {"repetition_penalty": dict(repetition_penalty=1.6, no_repeat_ngram_size=2),
             # ban tokens greedy decoding would pick: one alone, one after its predecessor
             "bad_words": dict(bad_words_ids=[[free[0]], [free[4], free[5]]]),
             "min_new_tokens": dict(min_new_tokens=13)}[processors]
    plain = llama.generate(ids, **base, **extra)
    ours = llama.generate(ids, **base, **extra, **FULL)
    assert torch.equal(ours, plain)
    assert plain.tolist() != llama.generate(ids, **base).tolist(), "the processor must change the output"


def test_streamer_and_dict_output_like_plain_generate(llama):
    ids, mask = _padded(BATCH[:2], "left")
    kw = dict(attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_scores=True,
              output_logits=True, **GREEDY)
    s_plain, s_ours = Recorder(), Recorder()
    plain = llama.generate(ids, streamer=s_plain, **kw, repetition_penalty=1.3)
    ours = llama.generate(ids, streamer=s_ours, **kw, repetition_penalty=1.3, **FULL)
    assert type(ours) is type(plain) is transformers.generation.GenerateDecoderOnlyOutput
    assert torch.equal(ours.sequences, plain.sequences)
    assert len(ours.scores) == len(plain.scores) == len(ours.logits) == 6
    for a, b in zip(ours.scores + ours.logits, plain.scores + plain.logits):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    assert not torch.equal(ours.scores[1], ours.logits[1]), "scores are processed, logits are raw"
    assert s_ours.ended and s_plain.ended
    assert [p.tolist() for p in s_ours.puts] == [p.tolist() for p in s_plain.puts]


def test_sampling_same_seed_same_tokens(llama):
    ids = torch.tensor([PROMPT])
    kw = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=10, eos_token_id=None,
              pad_token_id=0)
    for seed in range(3):
        torch.manual_seed(seed)
        plain = llama.generate(ids, **kw)
        torch.manual_seed(seed)
        ours = llama.generate(ids, **kw, **FULL)
        assert torch.equal(ours, plain), seed


def test_sampling_distribution_matches():
    """First-token frequencies of many seeded draws, ours and plain, against the exact distribution."""
    llama = tiny_hf_model("llama", layers=2, seed=7)          # 2 layers: the 1000-row prompt passes stay cheap
    ids = torch.tensor([PROMPT])
    kw = dict(do_sample=True, temperature=0.4, top_k=8, max_new_tokens=1, eos_token_id=None, pad_token_id=0,
              num_return_sequences=N_DRAWS_PER_SEED)
    exact = torch.softmax(llama.generate(ids, **{**kw, "num_return_sequences": 1}, return_dict_in_generate=True,
                                         output_scores=True).scores[0][0], -1)
    hot = torch.softmax(llama.generate(ids, **{**kw, "num_return_sequences": 1, "temperature": 1.0},
                                       return_dict_in_generate=True, output_scores=True).scores[0][0], -1)
    V = exact.numel()

    def freqs(seeds, extra):
        counts = torch.zeros(V)
        for s in seeds:
            torch.manual_seed(s)
            out = llama.generate(ids, **kw, **extra)
            counts += torch.bincount(out[:, -1], minlength=V).float()
        return counts / counts.sum()

    tv = lambda p, q: 0.5 * float((p - q).abs().sum())  # noqa: E731
    plain = freqs(range(SEEDS), {})
    ours = freqs(range(1000, 1000 + SEEDS), FULL)        # other seeds: a statistical, not a bitwise, match
    assert int((exact > 0).sum()) == 8
    assert tv(plain, exact) < TV_MAX, tv(plain, exact)
    assert tv(ours, exact) < TV_MAX, tv(ours, exact)
    assert tv(hot, exact) > 2 * TV_MAX, "the test must be able to tell temperature 0.4 from 1.0"


# --------------------------------------------------------------------------- alpha < 1: Decoder.generate

@pytest.mark.parametrize("alpha,start,tail,order,fill", [(0.9, 0.2, 1, "bottom", "mask"),
                                                          (0.85, 0.0, 2, "top", "project")])
def test_d3_matches_decoder_generate(alpha, start, tail, order, fill):
    hf = tiny_hf_model("llama", layers=8, seed=3)
    ids, mask = _padded(BATCH, "left")
    ours = hf.generate(ids, attention_mask=mask, max_new_tokens=16, custom_generate=d3hf.generate,
                       d3_alpha=alpha, d3_start=start, d3_tail=tail, d3_order=order, d3_fill=fill,
                       d3_backend="reference", **GREEDY)[:, ids.shape[1]:]
    sched = D3Schedule(8, alpha=alpha, start=start, tail=tail, skip_order=order)
    g = Decoder(load_model(hf, device="cpu", dtype=torch.float32), sched, max_batch=3, max_seq_len=64,
                backend="reference", fill=fill).generate(BATCH, max_new_tokens=16, ignore_eos=True)
    assert min(len(k) for k in g.layers) < 8, "the schedule must actually skip layers"
    assert ours.tolist() == g.tokens.tolist()
    full = hf.generate(ids, attention_mask=mask, max_new_tokens=16, **GREEDY)[:, ids.shape[1]:]
    assert not torch.equal(ours, full), "D3 must change this model's output"


def test_d3_settings_from_generation_config_and_dict(llama):
    ids = torch.tensor([PROMPT])
    settings = dict(alpha=0.8, start=0.2, tail=1, order="top")
    kw = dict(max_new_tokens=10, custom_generate=d3hf.generate, d3_backend="reference", **GREEDY)
    by_kwargs = llama.generate(ids, **kw, **{f"d3_{k}": v for k, v in settings.items()})
    by_dict = llama.generate(ids, **kw, d3=settings)
    cfg = transformers.GenerationConfig(max_new_tokens=10, d3=settings, **GREEDY)
    by_config = llama.generate(ids, generation_config=cfg, custom_generate=d3hf.generate, d3_backend="reference")
    overridden = llama.generate(ids, generation_config=cfg, custom_generate=d3hf.generate, d3_alpha=1.0,
                                d3_backend="reference")
    full = llama.generate(ids, max_new_tokens=10, **GREEDY)
    assert torch.equal(by_kwargs, by_dict) and torch.equal(by_kwargs, by_config)
    assert torch.equal(overridden, full) and not torch.equal(by_kwargs, full)


def test_defaults_are_the_librarys():
    s = d3hf._d3_settings(transformers.GenerationConfig(), None, {})
    ref = D3Schedule(30)
    assert (s["alpha"], s["start"], s["tail"], s["order"], s["fill"]) == (ref.alpha, ref.start, ref.tail,
                                                                          ref.order_name, "mask")


# --------------------------------------------------------------------------- multi-turn: the cache passed back

class PrefillSpy:
    """Wraps StepCore.admit (every prefill): records, per call, the tokens prefilled per row and whether
    they continued what the rows held."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = StepCore.admit

        def admit(core, rows, ids, continued=False):
            self.calls.append(([len(r) for r in ids], continued))
            return real(core, rows, ids, continued)
        monkeypatch.setattr(StepCore, "admit", admit)


def _fresh_state(model):
    d3hf.release(model)           # every test starts from a new converted model and cache


def test_multi_turn_cache_matches_plain_generate(hf, monkeypatch):
    """At alpha=1, three turns that pass back the output's cache with the whole conversation plus a new
    message give plain generate()'s tokens over the whole conversation; turns 2 and 3 prefill only the new
    tokens (and the last generated one, not fed yet); the conversation outgrows the first cache."""
    _fresh_state(hf)
    spy = PrefillSpy(monkeypatch)
    kw = dict(max_new_tokens=24, return_dict_in_generate=True, **GREEDY, **FULL)
    out = hf.generate(torch.tensor([PROMPT]), **kw)
    cache = out.cache
    assert isinstance(cache, d3hf.D3KCache) and out.past_key_values is cache
    assert cache.conversation == out.sequences.tolist() and cache.get_seq_length() == len(PROMPT) + 23
    first_len = hf._d3kernels_state.decoder.cache.max_seq_len
    for turn, new in enumerate([[7, 8, 9, 10], [150, 3, 77, 21, 9, 60]], start=2):
        ids = torch.cat([out.sequences, torch.tensor([new])], dim=-1)
        plain = hf.generate(ids, max_new_tokens=24, **GREEDY)
        out = hf.generate(ids, cache=out.cache, **kw)
        assert torch.equal(out.sequences, plain), turn
        assert out.cache is cache and cache.prefilled == [1 + len(new)]
        assert spy.calls[-1] == ([1 + len(new)], True), turn
        assert cache.conversation == out.sequences.tolist()
    assert spy.calls[0] == ([len(PROMPT)], False) and len(spy.calls) == 3
    again = hf.generate(ids, cache=cache, **kw)           # the last input again (a shorter one): rewound to it
    assert torch.equal(again.sequences, plain) and cache.prefilled == [1]
    assert hf._d3kernels_state.decoder.cache.max_seq_len > first_len, "the conversation must outgrow the cache"


def test_multi_turn_left_padded_batch_with_eos(llama, monkeypatch):
    """A left-padded batch over three turns where one row stops at EOS: turn 2 passes back the output's
    sequences plus new tokens (the pads after the EOS masked out), turn 3 re-pads the conversations (the
    padding changes); each turn equals plain generate() on the same input, and only new tokens are prefilled."""
    _fresh_state(llama)
    spy = PrefillSpy(monkeypatch)
    ids, mask = _padded(BATCH, "left")
    free = llama.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)[:, ids.shape[1]:]
    eos = int(free[0, 3])                                                 # row 0 stops at its 4th token
    assert eos not in free[1].tolist() + free[2].tolist() + free[0, :3].tolist()
    plain_kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = llama.generate(ids, attention_mask=mask, return_dict_in_generate=True, **plain_kw, **FULL)
    assert torch.equal(out.sequences, llama.generate(ids, attention_mask=mask, **plain_kw))
    conv = out.cache.conversation
    assert conv[0] == BATCH[0] + free[0, :4].tolist()                     # ends with its EOS, no pads
    assert conv[1:] == [BATCH[b] + free[b].tolist() for b in (1, 2)]
    # turn 2: the sequences as returned, then 3 new tokens per row; the pads after row 0's EOS are masked
    plain_kw["eos_token_id"] = None
    gen_mask = torch.ones_like(out.sequences[:, ids.shape[1]:])
    gen_mask[0, 4:] = 0
    new = torch.tensor([[31, 32, 33], [41, 42, 43], [51, 52, 53]])
    ids2 = torch.cat([out.sequences, new], dim=-1)
    mask2 = torch.cat([mask, gen_mask, torch.ones_like(new)], dim=-1)
    plain = llama.generate(ids2, attention_mask=mask2, **plain_kw)
    out = llama.generate(ids2, attention_mask=mask2, cache=out.cache, return_dict_in_generate=True, **plain_kw,
                         **FULL)
    assert torch.equal(out.sequences, plain)
    assert spy.calls[-1] == ([4, 4, 4], True)
    # turn 3: the conversations re-padded, with new tokens of different lengths
    rows = [c + n for c, n in zip(out.cache.conversation, [[9], [8, 7, 6, 5, 4], [3, 2]])]
    ids3, mask3 = _padded(rows, "left")
    plain = llama.generate(ids3, attention_mask=mask3, **plain_kw)
    out = llama.generate(ids3, attention_mask=mask3, cache=out.cache, return_dict_in_generate=True, **plain_kw,
                         **FULL)
    assert torch.equal(out.sequences, plain)
    assert spy.calls[-1] == ([2, 6, 3], True)


@pytest.mark.parametrize("fill", ["mask", "project"])
def test_multi_turn_d3_matches_decoder_continue(fill):
    """At alpha<1 the turns continued through the cache are Decoder.generate(..., continue_=True)'s, not a
    fresh D3 request over the whole conversation (the earlier replies keep the depth they ran at)."""
    hf, twin = tiny_hf_model("llama", layers=8, seed=3), tiny_hf_model("llama", layers=8, seed=3)
    d3 = dict(d3_alpha=0.85, d3_start=0.2, d3_tail=1, d3_order="bottom", d3_fill=fill, d3_backend="reference")
    kw = dict(max_new_tokens=12, custom_generate=d3hf.generate, return_dict_in_generate=True, **d3, **GREEDY)
    sched = D3Schedule(8, alpha=0.85, start=0.2, tail=1, skip_order="bottom")
    dec = Decoder(load_model(hf, device="cpu", dtype=torch.float32), sched, max_batch=2, max_seq_len=128,
                  backend="reference", fill=fill)
    prompts = BATCH[:2]
    ids, mask = _padded(prompts, "left")
    out = hf.generate(ids, attention_mask=mask, **kw)
    g = dec.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert min(len(k) for k in g.layers) < 8, "the schedule must skip layers"
    assert out.sequences[:, ids.shape[1]:].tolist() == g.tokens.tolist()
    differs = False
    for new in ([[7, 8, 9], [60]], [[1, 2], [3, 4, 5, 6]]):
        rows = [c + n for c, n in zip(out.cache.conversation, new)]
        ids, mask = _padded(rows, "left")
        out = hf.generate(ids, attention_mask=mask, cache=out.cache, **kw)
        g = dec.generate(new, max_new_tokens=12, ignore_eos=True, continue_=True)
        assert out.sequences[:, ids.shape[1]:].tolist() == g.tokens.tolist()
        assert out.cache.conversation == dec.conversation
        fresh = twin.generate(ids, attention_mask=mask, max_new_tokens=12, custom_generate=d3hf.generate, **d3,
                              **GREEDY)         # on another copy: a call on hf would replace its conversation
        differs |= not torch.equal(fresh, out.sequences)
    assert differs, "continuing must differ from recomputing the earlier replies at full depth"


def test_empty_cache_updated_in_place_and_through_the_folder(llama):
    """D3KCache() passed to the first call, no return_dict: the object is updated in place and continues the
    conversation on the next call, also through the custom_generate/ folder."""
    _fresh_state(llama)
    cache = d3hf.D3KCache()
    assert cache.conversation is None and cache.get_seq_length() == 0
    ids = torch.tensor([PROMPT])
    seq = llama.generate(ids, max_new_tokens=8, cache=cache, **GREEDY, **FULL)
    assert cache.conversation == seq.tolist() and cache.prefilled == [len(PROMPT)]
    ids2 = torch.cat([seq, torch.tensor([[4, 5]])], dim=-1)
    ours = llama.generate(ids2, max_new_tokens=8, cache=cache, custom_generate=ROOT, trust_remote_code=True,
                          d3_alpha=1.0, d3_backend="reference", **GREEDY)
    assert torch.equal(ours, llama.generate(ids2, max_new_tokens=8, **GREEDY))
    assert cache.prefilled == [3] and cache.conversation == ours.tolist()


def test_stale_or_foreign_cache_rejected_before_running(llama, monkeypatch):
    """A cache whose conversation another call replaced, one from another model, a released one, another
    batch size or fill, a transformers cache, a bad token id: each raises before anything runs, and a
    rejected call leaves a valid cache usable."""
    from transformers.cache_utils import DynamicCache
    _fresh_state(llama)
    kw = dict(max_new_tokens=4, return_dict_in_generate=True, **GREEDY, **FULL)
    ids = torch.tensor([PROMPT])
    stale = llama.generate(ids, **kw).cache
    out = llama.generate(ids, **kw)                       # replaces the conversation `stale` refers to
    other = tiny_hf_model("llama", seed=11)
    foreign = other.generate(ids, **kw).cache
    state = llama._d3kernels_state

    def boom(*a, **k):
        raise AssertionError("ran before rejecting")
    monkeypatch.setattr(Decoder, "prefill", boom)
    monkeypatch.setattr(d3hf, "load_model", boom)
    monkeypatch.setattr(d3hf, "Decoder", boom)
    handle = llama.register_forward_pre_hook(boom)
    seq2 = torch.cat([out.sequences, torch.tensor([[1, 2]])], dim=-1)
    for cache, inputs, extra, match in [
            (stale, seq2, {}, "stale D3KCache: a later generate"),
            (foreign, seq2, {}, "another model"),
            (out.cache, seq2.repeat(2, 1), {}, "conversation of 1 rows, input_ids has 2"),
            (out.cache, seq2, {"d3_fill": "project"}, "d3_fill='mask'"),
            (DynamicCache(config=llama.config), seq2, {}, "must be a d3kernels.hf.D3KCache, got DynamicCache"),
            (out.cache, torch.cat([seq2, torch.tensor([[500]])], dim=-1), {}, "outside \\[0, 211\\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            llama.generate(inputs, cache=cache, **{**kw, **extra})
    assert llama._d3kernels_state is state and state.decoder is not None
    with pytest.raises(AttributeError, match="custom_generate=d3kernels.hf.generate"):
        llama.generate(seq2, cache=out.cache, max_new_tokens=2, **GREEDY)       # the model's own forward
    handle.remove()
    monkeypatch.undo()
    ours = llama.generate(seq2, cache=out.cache, **kw)          # the rejected calls changed nothing
    assert torch.equal(ours.sequences, llama.generate(seq2, max_new_tokens=4, **GREEDY))
    assert ours.cache.prefilled == [3]
    d3hf.release(llama)
    with pytest.raises(ValueError, match="release"):
        llama.generate(seq2, cache=ours.cache, **kw)
    d3hf.release(other)


# --------------------------------------------------------------------------- weights, memory, the folder

def test_weights_converted_once_and_reported(caplog):
    hf = tiny_hf_model("llama", seed=4)
    ids = torch.tensor([PROMPT])
    with caplog.at_level("WARNING", logger="d3kernels.hf"):
        a = hf.generate(ids, max_new_tokens=4, **GREEDY, **FULL)
        first = d3hf.converted_model(hf)
        hf.generate(ids, max_new_tokens=4, **GREEDY, **FULL)
    assert d3hf.converted_model(hf) is first
    assert sum("converted LlamaForCausalLM" in r.message and "copies" in r.message for r in caplog.records) == 1
    mem = hf.d3kernels_memory
    layer_params = sum(p.numel() * 4 for n, p in hf.named_parameters() if ".layers." in n)
    assert mem["weights_copied_bytes"] == layer_params          # the fused per-layer stacks are copies
    assert mem["weights_shared_bytes"] == 2 * 211 * 64 * 4 + 64 * 4   # embed, lm_head, final norm: shared
    assert mem["kv_cache_bytes"] > 0
    with torch.no_grad():                                        # an in-place update is seen
        hf.lm_head.weight.mul_(-1)
    b = hf.generate(ids, max_new_tokens=4, **GREEDY, **FULL)
    assert d3hf.converted_model(hf) is not first
    assert torch.equal(b, hf.generate(ids, max_new_tokens=4, **GREEDY)) and not torch.equal(a, b)
    d3hf.release(hf)
    assert getattr(hf, "_d3kernels_state") is None


def test_custom_generate_folder(llama):
    """The repository root holds custom_generate/, so its path is what transformers loads."""
    assert os.path.isfile(os.path.join(ROOT, "custom_generate", "generate.py"))
    ids, mask = _padded(BATCH[:2], "left")
    kw = dict(attention_mask=mask, max_new_tokens=8, **GREEDY)
    streamer = Recorder()
    plain = llama.generate(ids, **kw)
    ours = llama.generate(ids, **kw, custom_generate=ROOT, trust_remote_code=True, d3_alpha=1.0,
                          d3_backend="reference", streamer=streamer)
    assert torch.equal(ours, plain)
    assert len(streamer.puts) == 9 and streamer.ended               # the prompt, then 8 steps
    d3 = llama.generate(ids, **kw, custom_generate=ROOT, trust_remote_code=True, d3_alpha=0.8, d3_start=0.2,
                        d3_backend="reference")
    ref = llama.generate(ids, **kw, custom_generate=d3hf.generate, d3_alpha=0.8, d3_start=0.2,
                         d3_backend="reference")
    assert torch.equal(d3, ref)


# --------------------------------------------------------------------------- what is rejected, before running

@pytest.fixture
def no_run(llama, monkeypatch):
    """Fails the test if anything runs: no Decoder prefill, no HF forward, no weight conversion."""
    d3hf.release(llama)

    def boom(*a, **k):
        raise AssertionError("ran before rejecting")
    monkeypatch.setattr(Decoder, "prefill", boom)
    monkeypatch.setattr(d3hf, "load_model", boom)
    handle = llama.register_forward_pre_hook(boom)
    yield llama
    handle.remove()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=2), "beam search"),
    (dict(do_sample=True, num_beams=2), "beam search"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(guidance_scale=1.5), "guidance"),
    (dict(prompt_lookup_num_tokens=3), "assisted"),
    (dict(d3_alpha=1.5), "alpha must be in"),
    (dict(d3_fill="zeros"), "d3_fill"),
    (dict(d3_order="calibrated"), "calibrate_skip_order"),
    (dict(d3={"alpha": 0.9, "beta": 1}), "unknown keys"),
    (dict(d3_backend="nonsense"), "backend"),
])
def test_rejected_before_running(no_run, kwargs, match):
    with pytest.raises(ValueError, match=match):
        no_run.generate(torch.tensor([PROMPT]), max_new_tokens=4, custom_generate=d3hf.generate, **kwargs)


def test_assistant_and_cache_rejected_before_running(no_run):
    from transformers.cache_utils import DynamicCache
    ids = torch.tensor([PROMPT])
    with pytest.raises(ValueError, match="assisted"):
        no_run.generate(ids, max_new_tokens=4, custom_generate=d3hf.generate, assistant_model=tiny_hf_model("llama"))
    with pytest.raises(ValueError, match="cache passed to generate.*D3KCache"):
        no_run.generate(ids, max_new_tokens=4, custom_generate=d3hf.generate,
                        cache=DynamicCache(config=no_run.config))
    with pytest.raises(ValueError, match="assisted"):
        no_run.generate(ids, max_new_tokens=4, custom_generate=ROOT, trust_remote_code=True,
                        assistant_model=tiny_hf_model("llama"))


def test_unsupported_architecture_rejected():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        gpt2.eval().generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, custom_generate=d3hf.generate,
                             pad_token_id=0)


# --------------------------------------------------------------------------- the embedded SmolLM2, via transformers

@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("accelerate")
    import d3kernels
    from d3kernels.model import _gguf_tokenizer     # the tokenizer converted once and cached by d3kernels
    try:
        path = d3kernels.embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"embedded model missing: {e}")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    yield hf, _gguf_tokenizer(path)
    d3hf.release(hf)


@pytest.mark.slow
def test_smollm2_greedy_and_stop_strings(smol):
    hf, tok = smol
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=8, do_sample=False)
    plain = hf.generate(ids, **kw)
    ours = hf.generate(ids, **kw, **FULL)
    assert torch.equal(ours, plain)
    assert "Paris" in tok.decode(ours[0, ids.shape[1]:])
    stop = dict(stop_strings=["Paris"], tokenizer=tok)
    plain = hf.generate(ids, **kw, **stop)
    ours = hf.generate(ids, **kw, **stop, custom_generate=ROOT, trust_remote_code=True, d3_alpha=1.0,
                       d3_backend="reference")
    assert torch.equal(ours, plain)
    assert tok.decode(ours[0, ids.shape[1]:]).endswith("Paris")


# --------------------------------------------------------------------------- lossless D3

def test_speculative_equals_plain_greedy_generate(llama):
    """d3_speculative=k: D3 drafts, full depth verifies; the sequences are plain greedy generate()'s, with
    a left-padded batch, EOS at different steps and max_length."""
    ids, mask = _padded(BATCH, "left")
    free = llama.generate(ids, attention_mask=mask, max_new_tokens=14, **GREEDY)[:, ids.shape[1]:]
    eos = [int(free[0, 5]), int(free[2, 8])]
    kw = dict(attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=0, max_new_tokens=14)
    plain = llama.generate(ids, **kw)
    for k in (1, 4):
        ours = llama.generate(ids, **kw, custom_generate=d3hf.generate, d3_alpha=0.9, d3_start=0.25,
                              d3_backend="reference", d3_speculative=k)
        assert torch.equal(ours, plain), k
    with pytest.raises(ValueError, match="greedy"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, pad_token_id=0,
                       custom_generate=d3hf.generate, d3_speculative=2)
