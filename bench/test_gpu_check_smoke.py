"""The pieces of `bench/gpu_check.sh all` run on the CPU (smoke mode), so a broken script is found here
and not on a rented GPU: the quick benchmark, the PDL/graph consistency check and the shell script's syntax."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pdl_check
import quick_bench

BENCH = Path(__file__).resolve().parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run measures; this is the CPU smoke run")
def test_quick_bench_smoke(tmp_path):
    out = {k: str(tmp_path / f"q.{k}") for k in ("json", "md", "summary")}
    rc = quick_bench.main(["--json", out["json"], "--md", out["md"], "--summary", out["summary"],
                           "--backends", "reference"])
    res = json.loads(Path(out["json"]).read_text())
    assert rc == 0, res["errors"]
    assert res["read_bw_gbps"] > 0 and len(res["ops"]) == 6            # 3 ops x (reference, torch)
    impls = {r["impl"] for r in res["decode"]}
    assert impls == {"reference", "torch-eager", "reference-paged16"}
    paged = next(r for r in res["decode"] if r["impl"] == "reference-paged16")
    assert paged["vs_contiguous"] > 0 and paged["mean_layers"] == res["decode"][0]["mean_layers"]
    d3 = res["d3"][0]
    assert d3["alpha"] < 1 and d3["ideal_speedup"] > 1 and d3["mean_layers"] < res["decode"][0]["mean_layers"]
    assert {r["impl"] for r in res["launches"]} == {"reference", "torch-eager"}
    assert all(r["op_calls_per_kept_layer"] == 2 for r in res["launches"])     # attn_block + mlp_block
    assert res["ttft"][0]["ttft_ms"] > 0
    summary = Path(out["summary"]).read_text()
    assert "SMOKE MODE" in summary and "cases: " in summary and "| attn_block |" in Path(out["md"]).read_text()


def test_quick_bench_budget_skips_cases(tmp_path):
    p = str(tmp_path / "q.json")
    assert quick_bench.main(["--json", p, "--budget-s", "1e-9", "--only", "read_bw,ops"]) == 0
    res = json.loads(Path(p).read_text())
    assert not res["ops"] and res["skipped"] and not res["errors"]


def test_pdl_check_smoke(tmp_path):
    a, b = str(tmp_path / "on.pt"), str(tmp_path / "off.pt")
    if torch.cuda.is_available():
        pytest.skip("on a GPU this runs in two processes (bench/gpu_check.sh pdl)")
    assert pdl_check.main(["run", "--out", a]) == 0
    assert pdl_check.main(["run", "--out", b]) == 0
    assert pdl_check.main(["compare", a, b, "--json", str(tmp_path / "pdl.json")]) == 0
    assert json.loads((tmp_path / "pdl.json").read_text())["ok"]
    bad = torch.load(b, weights_only=False)
    bad["eager"]["logits"][2, 0, 1] += 1.0                          # one changed logit, one failed part
    bad["graph"] = {"error": "RuntimeError: capture failed"}
    torch.save(bad, b)
    assert pdl_check.main(["compare", a, b, "--json", str(tmp_path / "bad.json")]) == 1
    res = json.loads((tmp_path / "bad.json").read_text())
    diffs = {r["check"]: r for r in res["checks"] if not r["equal"]}
    assert diffs["PDL on vs off: eager logits"]["first_diff"] == 2
    assert "pdl_off: graph vs eager logits" in diffs and any("capture failed" in n for n in res["notes"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
