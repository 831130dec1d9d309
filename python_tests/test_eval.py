"""`d3kernels eval` / `calibrate`: exact at alpha=1, monotone in a controlled setting, calibrated
orders are permutations of the flex layers, clear errors; one small run on the embedded model."""
import json
import os

import pytest
import torch

import d3kernels
from d3kernels import D3Schedule, load_model
from d3kernels.calibrate import (builtin_prompts, cache_path, calibrate_skip_order, layer_similarity,
                                 read_prompts)
from d3kernels.cli import main
from d3kernels.eval import best_setting, evaluate, format_table
from d3kernels.model import user_cache_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """A private calibration cache."""
    monkeypatch.setenv("D3K_CACHE_DIR", str(tmp_path / "cache"))


def _tiny(seed: int = 0, layers: int = 6):
    """A random tiny Llama (transformers' own init), loaded as a d3kernels Model without tokenizer."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None))
    return load_model(hf, device="cpu", dtype=torch.float32)


def _prompts(lengths=(3, 5, 8, 11, 4, 6)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def test_alpha_one_is_exact():
    """At alpha = 1 every order and core runs the full model: perfect agreement, zero perplexity increase."""
    r = evaluate(_tiny(), _prompts(), alphas=[1.0], starts=[0.0, 0.5], tails=[0, 2],
                 orders=["bottom", "top", "calibrated"], max_new_tokens=10, progress=False)
    assert len(r["results"]) == 12 and r["unique_runs"] == 1
    for row in r["results"]:
        assert row["tf_agreement"] == 1.0 and row["fr_agreement"] == 1.0
        assert row["ppl_increase"] == 0.0 and row["ppl"] == row["ppl_full"]
        assert row["first_divergence"] == 10 and row["mean_layers"] == 6 and row["ideal_speedup"] == 1.0
    assert r["scored_positions"] == 6 * 9          # steps 1..9 of 6 rows (the tiny model has no EOS)


def test_exact_against_the_decoder():
    """The eval's reference is the decoder's own greedy output, and its D3 free-running rows are
    Decoder.generate under the same schedule."""
    m, prompts = _tiny(), _prompts()
    r = evaluate(m, prompts, alphas=[0.8], starts=[0.0], tails=[0], orders=["bottom"], max_new_tokens=8,
                 progress=False)
    for alpha in (1.0, 0.8):
        dec = d3kernels.Decoder(m, D3Schedule(6, alpha=alpha, start=0.0, tail=0), max_batch=6, max_seq_len=32)
        g = dec.generate(prompts, 8, ignore_eos=True)
        if alpha == 1.0:
            assert g.tokens.tolist() == r["reference"]["tokens"]
        else:
            ref = torch.tensor(r["reference"]["tokens"])
            agree = (g.tokens == ref)[:, 1:].double().mean().item()
            assert agree == pytest.approx(r["results"][0]["fr_agreement"])


def test_scoring_stops_at_reference_eos():
    m, prompts = _tiny(), _prompts()
    ref = evaluate(m, prompts, alphas=[1.0], orders=["bottom"], tails=[1], max_new_tokens=8,
                   progress=False)["reference"]["tokens"]
    eos = ref[0][3]
    m.config.eos_token_ids = (eos,)
    r = evaluate(m, prompts, alphas=[1.0], orders=["bottom"], tails=[1], max_new_tokens=8, progress=False)
    ends = [next((i for i, t in enumerate(row) if t == eos), 7) for row in ref]
    assert ends[0] <= 3
    assert r["scored_positions"] == sum(ends) and r["results"][0]["first_divergence_rows"] == [e + 1 for e in ends]


@pytest.mark.parametrize("seed", [0, 1])
def test_monotone_in_depth(seed):
    """Controlled setting (seeded tiny model, fixed prompts, "bottom" order, no core): as alpha falls,
    fewer layers run, the ideal speedup rises, agreement falls and the perplexity increase grows."""
    alphas = [1.0, 0.95, 0.9, 0.8, 0.6, 0.3]
    r = evaluate(_tiny(seed), _prompts(), alphas=alphas, starts=[0.0], tails=[0], orders=["bottom"],
                 max_new_tokens=16, progress=False)
    rows = sorted(r["results"], key=lambda x: -x["alpha"])
    assert [x["alpha"] for x in rows] == alphas
    for a, b in zip(rows, rows[1:]):
        assert b["mean_layers"] < a["mean_layers"]
        assert b["ideal_speedup"] > a["ideal_speedup"]
        assert b["tf_agreement"] <= a["tf_agreement"]
        assert b["ppl_increase"] > a["ppl_increase"]
    assert rows[-1]["tf_agreement"] < 0.5


def test_calibrated_order(tmp_path, monkeypatch):
    m, prompts = _tiny(layers=8), _prompts()
    sims = layer_similarity(m, prompts, max_new_tokens=6)
    assert len(sims) == 8 and all(-1.0 <= s <= 1.0 for s in sims)
    for start, tail in [(0.0, 0), (0.25, 1), (0.5, 2), (0.5, 4)]:
        order = calibrate_skip_order(m, prompts, start=start, tail=tail, max_new_tokens=6)
        flex = D3Schedule(8, start=start, tail=tail).flex_layers
        assert sorted(order) == list(flex)
        assert [sims[l] for l in order] == sorted((sims[l] for l in flex), reverse=True)   # most redundant first
        D3Schedule(8, alpha=0.9, start=start, tail=tail, skip_order=order)                  # accepted as is
    # the cache keeps it: a second call does not measure again
    path = cache_path(m)
    assert path.startswith(str(tmp_path / "cache")) and os.path.exists(path)
    calls = []
    measure = d3kernels.calibrate.layer_similarity
    monkeypatch.setattr("d3kernels.calibrate.layer_similarity", lambda *a, **k: calls.append(1) or measure(*a, **k))
    assert calibrate_skip_order(m, prompts, start=0.5, tail=1, max_new_tokens=6) == \
        sorted(range(4, 7), key=lambda l: (-sims[l], l))
    assert calls == []
    # other prompts are another entry; recompute=True measures again; another model is another file
    calibrate_skip_order(m, prompts[:2], max_new_tokens=6)
    calibrate_skip_order(m, prompts, max_new_tokens=6, recompute=True)
    assert len(calls) == 2
    assert len(json.load(open(path))["entries"]) == 2
    assert cache_path(_tiny(seed=1, layers=8)) != path


def test_cache_dir_overrides(monkeypatch, tmp_path):
    assert user_cache_dir() == str(tmp_path / "cache")
    monkeypatch.delenv("D3K_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == str(tmp_path / "xdg" / "d3kernels")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "d3kernels")


def test_prompts(tmp_path):
    p = builtin_prompts()
    assert 24 <= len(p) <= 100 and len(set(p)) == len(p) and all(isinstance(x, str) and x for x in p)
    (tmp_path / "a.jsonl").write_text('{"prompt": "one"}\n\n{"prompt": "two", "x": 1}\n')
    assert read_prompts(str(tmp_path / "a.jsonl")) == ["one", "two"]
    (tmp_path / "b.txt").write_text("first prompt\n\n second prompt \n")
    assert read_prompts(str(tmp_path / "b.txt")) == ["first prompt", "second prompt"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        read_prompts(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("kw, match", [
    (dict(alphas=[0.0]), r"alpha must be in \(0, 1\]"),
    (dict(alphas=[1.5]), r"alpha must be in \(0, 1\]"),
    (dict(alphas=[]), "at least one"),
    (dict(orders=["sideways"]), "unknown skip order 'sideways'; choose from bottom, top, calibrated"),
    (dict(starts=[1.2]), r"start must be in \[0, 1\]"),
    (dict(tails=[-1]), "tail must be an integer"),
    (dict(tails=[5], starts=[0.5]), "tail must be an integer in"),        # no layer left: from D3Schedule
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 2"),
    (dict(max_new_tokens=1), "max_new_tokens must be an integer >= 2"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=["text"]), "no tokenizer"),
])
def test_bad_options(kw, match):
    kw = {"prompts": _prompts()[:2], "progress": False, **kw}
    with pytest.raises(ValueError, match=match):
        evaluate(_tiny(), **kw)


def test_cli_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for argv, msg in [(["eval", "--alphas", "0.99,1.5"], "alpha must be in (0, 1]"),
                      (["eval", "--orders", "bottom,middle"], "unknown skip order 'middle'"),
                      (["eval", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 2"),
                      (["eval", "--alphas", "x"], "--alphas: cannot read 'x'"),
                      (["eval", "--prompts", str(empty)], f"prompts file {empty} is empty"),
                      (["eval", "--num-prompts", "0"], "--num-prompts must be >= 1")]:
        assert main(argv) == 2
        assert f"d3kernels: error: {msg}" in capsys.readouterr().err


def test_report_helpers():
    r = evaluate(_tiny(), _prompts(), alphas=[1.0, 0.9], starts=[0.0], tails=[0], orders=["bottom", "top"],
                 max_new_tokens=6, progress=False)
    text = format_table(r)
    assert "TF agree" in text and len(text.splitlines()) == 2 + 4
    assert format_table(r, markdown=True).startswith("| order")
    assert best_setting(r, min_tf_agreement=0.0, max_ppl_increase=1e9)["alpha"] == 0.9
    assert best_setting(r, min_tf_agreement=1.01) is None
    json.dumps(r)


def test_embedded_model_small_grid(tmp_path, capsys):
    """`d3kernels eval` and `calibrate` end to end on the embedded SmolLM2 model: table, JSON, PNG, order."""
    try:
        d3kernels.embedded_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"embedded model missing: {e}")
    out = tmp_path / "q.json"
    assert main(["eval", "--device", "cpu", "--num-prompts", "2", "--max-new-tokens", "6", "--alphas", "1", "0.99",
                 "--starts", "0.5", "--tails", "1", "--orders", "bottom,top", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TF agree" in text and "bottom" in text and "top" in text
    r = json.loads(out.read_text())
    assert r["num_layers"] == 30 and r["prompts"] == 2 and len(r["results"]) == 4
    full = [x for x in r["results"] if x["alpha"] == 1.0]
    assert all(x["tf_agreement"] == 1.0 and x["ppl_increase"] == 0.0 for x in full)
    d3 = [x for x in r["results"] if x["alpha"] == 0.99]
    assert all(x["mean_layers"] < 30 and x["ideal_speedup"] > 1.0 for x in d3)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "q.png").stat().st_size > 1000
    # `d3kernels calibrate` on the same model: similarities for all 30 layers, then the order
    assert main(["calibrate", "--device", "cpu", "--num-prompts", "2", "--max-new-tokens", "4", "--start", "0.5",
                 "--tail", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    order = [int(x) for x in lines[-1].split(",")]
    assert sorted(order) == list(range(15, 29)) and len(lines) == 1 + 30 + 2
