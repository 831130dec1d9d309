"""D3 inside a real vLLM (d3kernels.vllm_plugin), against stock vLLM and d3kernels' own Decoder.

vLLM pins its own torch, so it lives in a second venv, .venv-vllm, which scripts/vllm_venv.sh makes (the
first run of these tests calls it: about 2 minutes and 3.5 GB; D3K_VLLM_TESTS=0 skips them instead). The
tests run in the project's venv and drive vLLM through python_tests/vllm_driver.py (offline engine, token
ids in, token ids and the plugin's per-step trace out) and through `vllm serve`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from d3kernels import D3Schedule, Decoder, load_model
from d3kernels.model import save_hf
from helpers import tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "python_tests", "vllm_driver.py")
TINY_D3 = {"architectures": ["D3LlamaForCausalLM"], "d3_alpha": 0.8, "d3_start": 0.25, "d3_tail": 1}
SMOL_D3 = {"architectures": ["D3LlamaForCausalLM"], "d3_alpha": 0.9, "d3_start": 0.5, "d3_tail": 1}


def _make_venv(pytestconfig, venv: str) -> None:
    """Run scripts/vllm_venv.sh (about 2 min the first time), its progress shown through pytest's capture."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[test_vllm] no vLLM venv at {venv}: making it with scripts/vllm_venv.sh "
              "(set D3K_VLLM_TESTS=0 to skip these tests instead)", flush=True)
        p = subprocess.run([os.path.join(ROOT, "scripts", "vllm_venv.sh"), venv], cwd=ROOT, timeout=1200)
    if p.returncode != 0:
        pytest.fail(f"scripts/vllm_venv.sh failed (rc {p.returncode}); the vLLM tests need its venv")


@pytest.fixture(scope="session")
def vllm_python(pytestconfig):
    """The vLLM venv's python: $D3K_VLLM_PYTHON, else .venv-vllm (made on first use). D3K_VLLM_TESTS=0
    skips the vLLM tests."""
    if os.environ.get("D3K_VLLM_TESTS") == "0":
        pytest.skip("D3K_VLLM_TESTS=0: the tests against a real vLLM are off")
    if os.environ.get("D3K_VLLM_PYTHON"):
        return os.environ["D3K_VLLM_PYTHON"]
    venv = os.path.join(ROOT, os.environ.get("D3K_VLLM_VENV", ".venv-vllm"))
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        _make_venv(pytestconfig, venv)
    return python


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "PYTHON"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_vllm(python, tmp_path, spec: dict, timeout: int = 400, **env) -> dict:
    """Run vllm_driver.py on `spec` in the vLLM venv; its result dict."""
    spec_path, out_path = tmp_path / f"spec{time.monotonic_ns()}.json", tmp_path / f"out{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    p = subprocess.run([python, DRIVER, str(spec_path), str(out_path)], capture_output=True, text=True,
                       timeout=timeout, env=_env(**env), cwd=str(tmp_path))
    if p.returncode != 0:
        log = tmp_path / f"driver{time.monotonic_ns()}.log"
        log.write_text(p.stderr)
        errors = [ln for ln in p.stderr.splitlines() if "Error" in ln and "File " not in ln]
        raise AssertionError(f"vLLM driver failed (rc {p.returncode}; full log {log}); error lines:\n"
                             + "\n".join(ln[:400] for ln in errors[:12]) + f"\n...\n{p.stderr[-3000:]}")
    return json.loads(out_path.read_text())


def decoder_tokens(model, schedule, requests) -> list:
    """Each request alone through d3kernels' Decoder (reference backend, fill "mask"), greedy."""
    dec = Decoder(model, schedule, max_batch=1, max_seq_len=512, backend="reference", fill="mask")
    return [dec.generate([r["prompt"]], max_new_tokens=r["max_tokens"], ignore_eos=True).tokens[0].tolist()
            for r in requests]


def d3_layers(step: int, L: int, d3: dict) -> list:
    """The layers D3 runs at `step` (d3: the d3_alpha / d3_start / d3_tail overrides; order "bottom",
    decay from step 1), from the paper's rule as docs/design.md section 1 states it, written out here
    rather than taken from D3Schedule: N = floor(L alpha^step), at least the cores, all at step 0; the
    flex layers [s, L - tail) drop from s upward."""
    s, tail = math.floor(d3["d3_start"] * L + 0.5), d3["d3_tail"]
    n = L if step == 0 else max(s + tail, min(L, math.floor(L * d3["d3_alpha"] ** step + 1e-9)))
    return list(range(s)) + list(range(s + L - n, L))


def check_depth(trace, d3: dict, L):
    """Every forward called exactly the layers of the union of its tokens' kept sets (the youngest
    token's: they are nested), counted where the model calls them, and the decode steps really skipped
    layers."""
    assert trace, "the plugin wrote no trace"
    for rec in trace:
        assert rec["called"] == d3_layers(rec["step_min"], L, d3), rec
        assert rec["layer_calls"] == len(rec["called"]), rec
    assert min(rec["layer_calls"] for rec in trace) < L


# ------------------------------------------------------------------------------- no vLLM needed

def test_parameters_and_version_check():
    """The plugin's own checks, in this venv: d3_* fields to a D3Schedule, with the key in every error."""
    from types import SimpleNamespace

    from d3kernels import vllm_plugin as vp
    cfg = SimpleNamespace(num_hidden_layers=30, d3_alpha=0.99, d3_order=tuple(range(28, 5, -1)), d3_start=0.2)
    s = vp.schedule_from_config(cfg)
    assert (s.alpha, s.n_head_core, s.tail, s.skip_order[0]) == (0.99, 6, 1, 28)
    d = vp.schedule_from_config(SimpleNamespace(num_hidden_layers=30))       # d3kernels' defaults
    assert (d.alpha, d.start, d.tail, d.order_name) == (0.998, 0.5, 1, "bottom")
    for ov, name in BAD:
        with pytest.raises(ValueError, match=name):
            vp.schedule_from_config(SimpleNamespace(num_hidden_layers=8, **ov))
    vp.check_vllm_version("0.32.0")
    vp.check_vllm_version("0.32.3+cpu")
    with pytest.raises(RuntimeError, match="D3K_VLLM_UNTESTED"):
        vp.check_vllm_version("0.33.0")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_roundtrip(tmp_path, kind):
    """`d3kernels export` (save_hf) writes a HF directory that load_model and transformers read back with
    the same weights (Qwen2: qkv biases and tied embeddings)."""
    import transformers

    from d3kernels.cli import main
    src = tmp_path / "src"
    hf = tiny_hf_model(kind, layers=3)
    hf.save_pretrained(str(src))
    assert main(["export", str(tmp_path / "out"), "--model", str(src)]) == 0
    a, b = (load_model(str(p), device="cpu", packed=False) for p in (src, tmp_path / "out"))
    assert a.config == dataclasses.replace(b.config, name=a.config.name)
    for name in ("embed", "lm_head", "final_norm", "attn_norm", "wqkv", "bqkv", "wo", "mlp_norm", "w_gate_up",
                 "w_down"):
        x, y = getattr(a.weights, name), getattr(b.weights, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


# ------------------------------------------------------------------------------------------- tiny Llama

TINY_REQS = [{"prompt": [3, 17, 5, 99, 42], "max_tokens": 12},
             {"prompt": [7, 7, 150, 2, 61, 33, 8, 190, 11], "max_tokens": 10},
             {"prompt": [120], "max_tokens": 14}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama as a HF directory (head_dim 32: vLLM's CPU attention needs >= 32), its
    d3kernels Model, and 8 layers."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_hf_model("llama", layers=8, hidden_size=128, intermediate_size=192, num_attention_heads=4,
                  bos_token_id=1, eos_token_id=2).save_pretrained(str(path))
    return str(path), load_model(str(path), device="cpu", dtype=torch.float32)


def staggered(reqs):
    return [dict(r, arrive=a) for r, a in zip(reqs, (0, 3, 5))]


def test_alpha_1_equals_stock_vllm(vllm_python, tiny, tmp_path):
    path, model = tiny
    runs = [staggered(TINY_REQS)]
    stock = run_vllm(vllm_python, tmp_path, {"model": path, "runs": runs})
    d3 = run_vllm(vllm_python, tmp_path, {"model": path, "runs": runs,
                                          "overrides": dict(TINY_D3, d3_alpha=1.0)})
    assert d3["runs"][0]["tokens"] == stock["runs"][0]["tokens"]
    assert all(rec["layer_calls"] == 8 for rec in d3["runs"][0]["trace"])
    assert stock["runs"][0]["trace"] == []           # the stock model does not run the plugin's loop
    assert stock["prefix_caching"] and not d3["prefix_caching"], "D3 models run without prefix caching"
    full = decoder_tokens(model, D3Schedule(8, alpha=1.0), TINY_REQS)
    assert stock["runs"][0]["tokens"] == full


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_d3_equals_decoder(vllm_python, tiny, tmp_path, mode):
    """alpha < 1: each request alone and in a staggered batch gives the Decoder's tokens, under vLLM's
    torch.compile too (the depth must not freeze), with one layer call per layer of the union kept set."""
    path, model = tiny
    sched = D3Schedule(8, alpha=TINY_D3["d3_alpha"], start=TINY_D3["d3_start"], tail=TINY_D3["d3_tail"])
    want = decoder_tokens(model, sched, TINY_REQS)
    assert want != decoder_tokens(model, D3Schedule(8, alpha=1.0), TINY_REQS), "D3 changes nothing here"
    runs = [[r] for r in TINY_REQS] + [staggered(TINY_REQS)]
    got = run_vllm(vllm_python, tmp_path, {"model": path, "runs": runs, "overrides": TINY_D3,
                                           "eager": mode == "eager"})
    for k, r in enumerate(TINY_REQS):
        assert got["runs"][k]["tokens"] == [want[k]], f"request {k} alone"
        # alone: the prompt pass at full depth, then one forward per step i = 1, 2, ... at N_i layers
        trace = got["runs"][k]["trace"]
        assert [rec["step_min"] for rec in trace] == list(range(r["max_tokens"]))
        check_depth(trace, TINY_D3, 8)
    batch = got["runs"][-1]
    assert batch["tokens"] == want, "staggered batch"
    check_depth(batch["trace"], TINY_D3, 8)
    assert any(rec["step_min"] != rec["step_max"] for rec in batch["trace"]), "rows never at different steps"


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral(vllm_python, tmp_path, kind):
    """The other D3 architectures (Qwen2: qkv biases, tied embeddings; Mistral: MQA), staggered batch."""
    path = str(tmp_path / kind)
    tiny_hf_model(kind, layers=6, hidden_size=128, intermediate_size=192, num_attention_heads=4,
                  bos_token_id=1, eos_token_id=2).save_pretrained(path)
    model = load_model(path, device="cpu", dtype=torch.float32)
    arch = {"qwen2": "D3Qwen2ForCausalLM", "mistral": "D3MistralForCausalLM"}[kind]
    sched = D3Schedule(6, alpha=0.8, start=0.2, tail=1)
    want = decoder_tokens(model, sched, TINY_REQS)
    d3 = {"architectures": [arch], "d3_alpha": 0.8, "d3_start": 0.2, "d3_tail": 1}
    got = run_vllm(vllm_python, tmp_path, {"model": path, "runs": [staggered(TINY_REQS)], "overrides": d3})
    assert got["runs"][0]["tokens"] == want
    check_depth(got["runs"][0]["trace"], d3, 6)


def test_preemption_by_recompute(vllm_python, tiny, tmp_path):
    """A KV pool too small for the batch: vLLM preempts and recomputes. The recompute feeds each
    generated position again with its own step index, so it runs the depth it ran before and the tokens
    equal the unpreempted run's."""
    path, model = tiny
    sched = D3Schedule(8, alpha=TINY_D3["d3_alpha"], start=TINY_D3["d3_start"], tail=TINY_D3["d3_tail"])
    reqs = [{"prompt": [5 + k, 17, 3 * k + 1, 40, 9, 8, 7, 6, 5, 4, 3, 2], "max_tokens": 36, "arrive": 0}
            for k in range(4)]
    got = run_vllm(vllm_python, tmp_path, {"model": path, "runs": [reqs], "overrides": TINY_D3,
                                           "num_blocks": 4, "block_size": 32, "max_model_len": 64})
    run = got["runs"][0]
    assert sum(rec["recomputed"] for rec in run["trace"]) > 0, "no preemption happened"
    check_depth(run["trace"], TINY_D3, 8)
    assert run["tokens"] == decoder_tokens(model, sched, reqs)


def test_tensor_parallel_2_equals_1(vllm_python, tiny, tmp_path):
    """TP=2 on the 2 cores (one thread per rank): each rank computes the same step indices."""
    path, _ = tiny
    spec = {"model": path, "runs": [staggered(TINY_REQS)], "overrides": TINY_D3}
    one = run_vllm(vllm_python, tmp_path, spec)
    two = run_vllm(vllm_python, tmp_path, dict(spec, tp=2), VLLM_CPU_OMP_THREADS_BIND="0|1")
    assert two["runs"][0]["tokens"] == one["runs"][0]["tokens"]
    pids = {rec["pid"] for rec in two["runs"][0]["trace"]}
    assert len(pids) == 2, "both ranks run the D3 loop"


BAD = [({"d3_alpha": 1.5}, "d3_alpha"), ({"d3_alpha": 0}, "d3_alpha"), ({"d3_start": 2}, "d3_start"),
       ({"d3_tail": 99}, "d3_tail"), ({"d3_order": "middle"}, "d3_order"), ({"d3_order": [1, 2]}, "d3_order"),
       ({"d3_decay_start": -1}, "d3_decay_start"), ({"d3_alpah": 0.9}, "d3_alpah")]

BAD_SCRIPT = r"""
import json, sys
from vllm import LLM
out = []
for ov in json.loads(sys.argv[2]):
    try:
        LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
            hf_overrides=ov)
        out.append(None)
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}")
print("RESULT " + json.dumps(out))
"""


def run_script(python, script: str, *args) -> object:
    """Run `script` (guarded by __main__) in the vLLM venv; the JSON it printed after "RESULT "."""
    p = subprocess.run([python, "-c", "if __name__ == '__main__':\n" + "\n".join(
        "    " + line for line in script.strip().splitlines()), *args],
        capture_output=True, text=True, timeout=300, env=_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, p.stderr[-4000:]
    return json.loads(line[-1][len("RESULT "):])


def test_bad_parameters_fail_at_startup(vllm_python, tiny, tmp_path):
    path, _ = tiny
    cases = [dict(TINY_D3, **ov) for ov, _ in BAD] + [{"d3_alpha": 0.9}]       # the last: a stock architecture
    errors = run_script(vllm_python, BAD_SCRIPT, path, json.dumps(cases))
    for (ov, name), err in zip(BAD, errors):
        assert err is not None and (f"bad D3 parameter {name}:" in err or f"unknown D3 parameter(s) ['{name}']" in err), \
            (ov, err)
    assert errors[-1] is not None and "D3LlamaForCausalLM" in errors[-1], errors[-1]


POLICY_SCRIPT = r"""
import json
from types import SimpleNamespace
from vllm.config import CUDAGraphMode
from d3kernels.vllm_plugin.config import cudagraph_policy
out = []
for m in (None, "FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY", "PIECEWISE", "NONE"):
    c = SimpleNamespace(cudagraph_mode=None if m is None else CUDAGraphMode[m])
    cudagraph_policy(c)
    out.append(c.cudagraph_mode.name)
print("RESULT " + json.dumps(out))
"""


def test_no_full_cuda_graphs(vllm_python):
    """A full CUDA graph would replay one depth for every step: the startup hook turns vLLM's default
    (unset when the hook runs, FULL_AND_PIECEWISE on a GPU once vLLM fills it in) and any full mode into
    PIECEWISE."""
    assert run_script(vllm_python, POLICY_SCRIPT) == ["PIECEWISE"] * 5 + ["NONE"]


# ---------------------------------------------------------------------------------- the embedded model

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, vllm_python):
    """The embedded SmolLM2-135M exported as a HF directory (float32, with its tokenizer), its Model, two
    chat prompts of different lengths, and vLLM's offline D3 run of them (alone, then staggered)."""
    model = load_model(None, device="cpu", dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("smollm2"))
    save_hf(model, path)
    tok = model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("What is the capital of France?", "Name three rivers in Europe, please.")]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    reqs = [{"prompt": p, "max_tokens": n, "arrive": a} for p, n, a in zip(prompts, (16, 12), (0, 4))]
    got = run_vllm(vllm_python, tmp_path_factory.mktemp("smol_run"),
                   {"model": path, "runs": [reqs[:1], reqs], "overrides": SMOL_D3})
    return path, model, reqs, got


def test_embedded_model_equals_decoder(smollm2):
    path, model, reqs, got = smollm2
    L = model.config.num_layers
    sched = D3Schedule(L, alpha=SMOL_D3["d3_alpha"], start=SMOL_D3["d3_start"], tail=SMOL_D3["d3_tail"])
    want = decoder_tokens(model, sched, reqs)
    assert got["runs"][0]["tokens"] == want[:1]
    assert got["runs"][1]["tokens"] == want
    check_depth(got["runs"][1]["trace"], SMOL_D3, L)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_openai_server(vllm_python, smollm2, tmp_path):
    """`vllm serve` with the plugin: an HTTP client gets the offline run's completion; the server then
    shuts down cleanly on SIGTERM. Bounded: 240 s to start, 60 s per request, 60 s to stop."""
    path, model, reqs, got = smollm2
    port = _free_port()
    vllm_bin = os.path.join(os.path.dirname(vllm_python), "vllm")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([vllm_bin, "serve", path, "--port", str(port), "--host", "127.0.0.1",
                             "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                             "--hf-overrides", json.dumps(SMOL_D3)], stdout=log, stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not start in 240 s"
            time.sleep(1)
        name = _post(base + "/v1/completions", {"model": path, "prompt": reqs[0]["prompt"], "max_tokens": 16,
                                                "temperature": 0, "ignore_eos": True})
        text = name["choices"][0]["text"]
        assert text == model.tokenizer.decode(got["runs"][0]["tokens"][0], skip_special_tokens=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("vllm serve did not stop within 60 s of SIGTERM")
        finally:
            log.close()
    assert rc == 0, f"vllm serve exited with {rc}:\n" + (tmp_path / "serve.log").read_text()[-3000:]
    deadline = time.monotonic() + 30        # its engine process may finish a moment after the server
    while True:
        left = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(proc.pid)], capture_output=True,
                              text=True).stdout.strip()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes left behind 30 s after the server exited:\n{left}"


def test_serve_rejects_bad_parameter(vllm_python, tiny, tmp_path):
    path, _ = tiny
    vllm_bin = os.path.join(os.path.dirname(vllm_python), "vllm")
    p = subprocess.run([vllm_bin, "serve", path, "--port", str(_free_port()), "--skip-tokenizer-init",
                        "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
                        "--hf-overrides", json.dumps(dict(TINY_D3, d3_alpha=2.0))],
                       capture_output=True, text=True, timeout=180, env=_env())
    assert p.returncode != 0
    assert "bad D3 parameter d3_alpha" in p.stdout + p.stderr
