"""bench/serving_bench.py in smoke mode: the depth simulation, and a real Server run on a tiny model (CPU)."""
import sys
from pathlib import Path

import pytest
import torch

import serving_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
from helpers import tiny_model  # noqa: E402

from d3kernels import D3Schedule  # noqa: E402


def test_simulation_batch_one_keeps_the_whole_saving_and_batching_less():
    sched = D3Schedule(30)
    alone = serving_bench.simulate(sched, 1, 0.9 / 255, 256, steps=3000)
    assert abs(alone["kept_ratio"] - alone["ideal_ratio"]) < 0.02   # requests cut at the window ends
    many = serving_bench.simulate(sched, 8, 0.9 * 8 / 255, 256, steps=3000)
    assert many["mean_union_depth"] > many["mean_row_depth"] and many["kept_ratio"] < alone["kept_ratio"]
    assert 6 < many["mean_live"] <= 8


@pytest.mark.parametrize("page_size", [None, 16])
def test_server_run_smoke(page_size):
    model = tiny_model(L=6, d=64, H=4, H_kv=2, D=16, F=96, V=101, seed=1)
    r = serving_bench.run(model, D3Schedule(6, alpha=0.8, start=0.2), B=4, rate=0.5, n_tokens=8, n_requests=6,
                          backend="reference", page_size=page_size)
    assert r["tokens"] == 6 * 8 and r["steps"] > 0 and r["mean_step_depth"] >= r["mean_row_depth"]
    assert r["free_pages"] == (None if page_size is None else 4 * 5)     # every page back in the pool
