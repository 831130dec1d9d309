"""A skipped layer costs zero launches: op calls per decode step are counted at
several depths and must be linear in the number of kept layers, with a
per-layer constant that does not depend on L."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from d3kernels import D3Schedule, Decoder, load_model  # noqa: E402


class Counting:
    """Wraps a backend module and counts every op call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def counted(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **k)
        return counted


def _model(L):
    torch.manual_seed(L)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=L,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    return load_model(transformers.LlamaForCausalLM(cfg), device="cpu", dtype=torch.float32)


def _calls_per_step(L, alpha, fill, steps=24):
    dec = Decoder(_model(L), D3Schedule(L, alpha=alpha, start=0.0, tail=1), max_seq_len=64, fill=fill)
    dec.prefill([[1, 2, 3]])
    counter = Counting(dec.core.ops)
    dec.core.ops = counter
    rows = []
    for _ in range(steps):
        n_kept = dec.schedule.num_kept(dec.i)
        counter.calls.clear()
        dec.step([4])
        rows.append((n_kept, dict(counter.calls)))
    return rows


@pytest.mark.parametrize("L", [4, 12])
def test_mask_fill_launches_only_kept_layers(L):
    rows = _calls_per_step(L, alpha=0.9, fill="mask")
    depths = {n for n, _ in rows}
    assert len(depths) >= 3, "the test must see several depths"
    for n_kept, calls in rows:
        # two ops per kept layer + the lm_head; nothing for skipped layers, nothing that grows with L
        assert calls == {"attn_block": n_kept, "mlp_block": n_kept, "lm_head": 1}, (n_kept, calls)


@pytest.mark.parametrize("L", [4, 12])
def test_project_fill_adds_one_writer_call_per_skipped_run(L):
    for n_kept, calls in _calls_per_step(L, alpha=0.9, fill="project"):
        runs = 1 if n_kept < L else 0            # "bottom" order skips one contiguous run
        assert calls.get("write_kv", 0) == runs and calls["attn_block"] == n_kept, (n_kept, calls)
