"""The report script turns a benchmark JSON into a table and plots (runs on the smoke JSON)."""
import json
import os

import report


def test_report_roundtrip(tmp_path):
    rows = [
        {"kind": "op", "op": "mlp_block", "shape": "tiny", "backend": "reference", "context": 16, "median_us": 10.0,
         "gbps": 1.0, "frac_of_read_bw": 0.5, "read_bw_gbps": 2.0, "gpu": "cpu", "smoke": True},
    ] + [
        {"kind": "decode", "impl": "d3kernels-reference", "shape": "tiny", "alpha": a, "mean_layers": n,
         "ms_per_token": ms, "tokens_per_s": 1e3 / ms, "frac_of_read_bw": 0.1, "speedup_vs_full": s,
         "ideal_speedup": 1.2, "fraction_of_ideal": None}
        for (a, n, ms, s) in [(1.0, 6, 2.0, None), (0.9, 5, 1.8, 1.11)]
    ] + [{"kind": "depth_sweep", "impl": "d3kernels-reference", "shape": "tiny",
          "rows": [{"kept": 6, "us": 5.0, "ideal_us": 4.0, "frac_of_read_bw": 0.8}]}]
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"benchmarks": [{"extra_info": r} for r in rows]}))
    assert report.main([str(p), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| mlp_block | tiny | reference |" in md and "SMOKE MODE" in md and "| 0.9 |" in md
    if os.path.exists(tmp_path / "out" / "tokens_vs_alpha.png"):
        assert (tmp_path / "out" / "step_vs_layers.png").stat().st_size > 1000
