"""d3kernels.engine (plan / Buffers / run_layers): the engine-facing API for batches at mixed depths."""
import os
import re

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import tiny_model

import d3kernels
from d3kernels import D3Schedule, Decoder, engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_is_the_union_with_per_row_masks():
    sched = D3Schedule(6, alpha=0.7, start=0.2, tail=1)
    p = engine.plan(sched, [1, None, 5], "copy")
    assert p.kept == sched.kept_layers(1) and len(sched.kept_layers(5)) < len(p.kept)
    for l in range(6):
        assert p.mask[l].tolist() == [int(l in sched.kept_layers(1)), 0, int(l in sched.kept_layers(5))]
    assert p.copy[:, 1].sum() == 0 and p.copy[:, 2].tolist() == [1 - m for m in p.mask[:, 2].tolist()]
    q = engine.plan(sched, [1, None, 5], "project")
    for l, f in q.project.items():                 # a row's flags mark its whole skipped run from its start
        for b in range(3):
            run = f[:, b].nonzero().flatten().tolist()
            assert run == [] or (run[0] == l and run == list(range(l, run[-1] + 1)))
    with pytest.raises(ValueError, match="step index"):
        engine.plan(sched, [-1], "mask")
    with pytest.raises(ValueError, match="step index"):
        engine.plan(sched, [1.0], "mask")
    z = engine.plan(sched, [0, 3], "copy")         # step 0: a prompt token, full depth, nothing to fill
    assert z.kept == tuple(range(sched.num_layers)) and z.mask[:, 0].all() and z.copy[:, 0].sum() == 0
    with pytest.raises(ValueError, match="fill"):
        engine.plan(sched, [1], "bogus")


def _readme_blocks() -> list:
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("\n## Engine API: one batch, rows at different depths\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)\n```", section, re.S)


def test_readme_engine_loop_compiles_and_equals_each_request_alone(monkeypatch):
    """The README's loop, run as written on a tiny model (aot_eager keeps compiles short): one graph per union
    kept set, no graph break, and each row's tokens are its request's tokens run alone."""
    model = tiny_model(L=6, V=101)
    monkeypatch.setattr(d3kernels, "load_model", lambda *a, **k: model)
    # a schedule that drops a layer every step or two on 6 layers, so the two rows' depths differ
    monkeypatch.setattr(d3kernels, "D3Schedule", lambda L, alpha: D3Schedule(L, alpha=0.85, start=0.2, tail=1))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compile_(f, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    ns = {}
    contiguous, paged = _readme_blocks()
    with torch._dynamo.config.patch(recompile_limit=64):
        exec(compile(contiguous, "<README.md, engine loop>", "exec"), ns)   # not a file name: tracing reads by line
    assert not counters["graph_break"]
    sched = ns["sched"]
    plans = [engine.plan(sched, [t + 1, None if t < 4 else t - 3], "mask") for t in range(12)]
    assert any(len(p.kept) > len(sched.kept_layers(t + 1)) for t, p in enumerate(plans)), "rows must mix depths"
    assert counters["stats"]["unique_graphs"] == len({p.kept for p in plans})
    # the paged loop: the same tokens (asserted in the block), one more graph per union kept set
    with torch._dynamo.config.patch(recompile_limit=64):
        exec(compile(paged, "<README.md, paged engine loop>", "exec"), ns)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2 * len({p.kept for p in plans})
    assert ns["out_paged"] == ns["out"] and ns["cache"].free_pages == 2
    for b, prompt in enumerate(([5, 17, 3], [9, 2, 44, 61])):
        dec = Decoder(model, ns["sched"], max_seq_len=64, backend="reference")
        n = len(ns["out"][b])
        assert ns["out"][b] == dec.generate([prompt], n, ignore_eos=True).tokens[0].tolist(), b
