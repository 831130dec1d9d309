"""The reference decoder against Hugging Face transformers (docs/design.md section 6).

Random tiny Llama (GQA, llama3 rope scaling), Qwen2 (qkv bias) and Mistral
models are saved with save_pretrained and loaded by our loader. At alpha=1 the
logits match transformers in fp32 and greedy tokens agree for 32 steps. At
alpha<1 our output equals an independent D3 run built here directly on the
transformers decoder layers.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from d3kernels import D3Schedule, Decoder, load_model  # noqa: E402
from helpers import HF_TINY, tiny_hf_model  # noqa: E402

TINY = {**HF_TINY, "num_hidden_layers": 5}
ATOL = 2e-4   # fp32 logits of magnitude ~1 after 5 layers; both sides accumulate in fp32


# llama: llama3 rope scaling; qwen2: its rope theta; mistral: the defaults
ROPE = {"llama": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        "qwen2": {"rope_type": "default", "rope_theta": 1e6}}


def _make(kind):
    return tiny_hf_model(kind, **({"rope_parameters": ROPE[kind]} if kind in ROPE else {}))


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def saved(request, tmp_path_factory):
    hf = _make(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, str(path)


PROMPTS = [[5, 17, 42, 99, 3, 120, 7], [11, 200, 8]]


def test_loads_config(saved):
    hf, path = saved
    m = load_model(path, device="cpu", dtype=torch.float32)
    c = hf.config
    assert (m.config.num_layers, m.config.hidden, m.config.heads, m.config.kv_heads, m.config.vocab) == (
        c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size)
    assert m.config.qkv_bias == (m.config.arch == "qwen2")


def test_prefill_and_step_logits(saved):
    hf, path = saved
    m = load_model(path, device="cpu", dtype=torch.float32)
    dec = Decoder(m, D3Schedule(m.config.num_layers, alpha=1.0), max_batch=2, max_seq_len=64)
    logits = dec.prefill(PROMPTS).clone()
    cont = [[33, 34, 35, 36], [60, 61, 62, 63]]
    steps = []
    for j in range(len(cont[0])):
        steps.append(dec.step([cont[0][j], cont[1][j]]).clone())
    for b, p in enumerate(PROMPTS):
        full = torch.tensor([p + cont[b]])
        with torch.no_grad():
            ref = hf(full).logits[0]
        n = len(p)
        torch.testing.assert_close(logits[b], ref[n - 1], atol=ATOL, rtol=0)
        for j, s in enumerate(steps):
            torch.testing.assert_close(s[b], ref[n + j], atol=ATOL, rtol=0)


def test_greedy_32_tokens(saved):
    hf, path = saved
    m = load_model(path, device="cpu", dtype=torch.float32)
    dec = Decoder(m, D3Schedule(m.config.num_layers, alpha=1.0), max_batch=1, max_seq_len=64)
    ours = dec.generate([PROMPTS[0]], max_new_tokens=32, ignore_eos=True).tokens[0].tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert ours == ref


def _hf_d3(hf, prompt, schedule, n_new):
    """Independent D3: transformers' own decoder layers and DynamicCache, running only the kept layers."""
    from transformers.cache_utils import DynamicCache
    inner = hf.model
    cache = DynamicCache(config=hf.config)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf(ids, past_key_values=cache, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        tokens, layers = [tok], [schedule.kept_layers(0)]
        for i in range(1, n_new):
            pos = torch.tensor([[len(prompt) + i - 1]])
            h = inner.embed_tokens(torch.tensor([[tok]]))
            pe = inner.rotary_emb(h, pos)
            kept = schedule.kept_layers(i)
            for l in kept:   # a skipped layer adds nothing to its cache; nesting keeps kept layers complete
                h = inner.layers[l](h, attention_mask=None, position_ids=pos, past_key_values=cache,
                                    use_cache=True, position_embeddings=pe)
                h = h[0] if isinstance(h, tuple) else h
            tok = int(hf.lm_head(inner.norm(h))[0, -1].argmax())
            tokens.append(tok)
            layers.append(kept)
    return tokens, layers


@pytest.mark.parametrize("alpha,start,tail,order", [(0.9, 0.2, 1, "bottom"), (0.85, 0.0, 2, "top")])
def test_d3_matches_independent_run(saved, alpha, start, tail, order):
    hf, path = saved
    m = load_model(path, device="cpu", dtype=torch.float32)
    sched = D3Schedule(m.config.num_layers, alpha=alpha, start=start, tail=tail, skip_order=order)
    g = Decoder(m, sched, max_seq_len=64).generate([PROMPTS[0]], max_new_tokens=16, ignore_eos=True)
    ref_tokens, ref_layers = _hf_d3(hf, PROMPTS[0], sched, 16)
    assert g.layers == ref_layers
    assert min(len(k) for k in g.layers) < m.config.num_layers, "the schedule must actually skip layers"
    assert g.tokens[0].tolist() == ref_tokens


def test_in_memory_model_and_old_config_spelling(saved, tmp_path):
    hf, path = saved
    a = load_model(hf, device="cpu", dtype=torch.float32)
    # rewrite config.json in the pre-transformers-5 spelling: rope_theta + rope_scaling
    cfg = json.load(open(os.path.join(path, "config.json")))
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params
    for fn in os.listdir(path):
        if fn.endswith(".safetensors"):
            os.symlink(os.path.join(path, fn), tmp_path / fn)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    b = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    assert a.config.rope_theta == b.config.rope_theta and a.config.rope_scaling == b.config.rope_scaling
    assert torch.equal(a.weights.wqkv, b.weights.wqkv)


def test_sharded_checkpoint(tmp_path):
    hf = _make("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    m = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    ref = load_model(hf, device="cpu", dtype=torch.float32)
    assert torch.equal(m.weights.w_down, ref.weights.w_down)


@pytest.mark.parametrize("edit,match", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "unsupported rope scaling type 'yarn'"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_unsupported_configs(saved, tmp_path, edit, match):
    hf, path = saved
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.update(edit)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=match):
        load_model(str(tmp_path), device="cpu")


def test_mistral_sliding_window(tmp_path):
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, num_key_value_heads=1,
                                                                   sliding_window=32))
    m = load_model(hf, device="cpu", dtype=torch.float32)
    Decoder(m, max_seq_len=32)           # a window covering the whole cache has no effect
    with pytest.raises(ValueError, match="sliding_window"):
        Decoder(m, max_seq_len=64)
