"""bench/serve_bench.py end to end at its smallest (one stream, two requests of 8 tokens): it starts the server,
streams, and writes rows whose counts add up."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serve_bench  # noqa: E402


def test_serve_bench_smoke(tmp_path):
    out = tmp_path / "rows.json"
    assert serve_bench.main(["--smoke", "--threads", "1", "--json", str(out)]) == 0
    rows = json.load(open(out))
    assert len(rows) == 1 and rows[0]["server"] == "d3kernels" and rows[0]["streams"] == 1
    r = rows[0]
    assert r["tokens"] == 2 * 8 and r["requests"] == 2
    assert r["tokens_per_s"] > 0 and 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"]
