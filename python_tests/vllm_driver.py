"""Runs a real vLLM offline engine for test_vllm.py, inside the vLLM venv (scripts/vllm_venv.sh).

    python vllm_driver.py SPEC.json OUT.json

SPEC: {"model": dir, "dtype": "float32", "eager": true, "overrides": {...} | null, "max_model_len": 512,
       "tp": 1, "num_blocks": null, "block_size": null, "max_num_seqs": null,
       "runs": [[{"prompt": [ids], "max_tokens": n, "arrive": engine step}, ...], ...]}
OUT:  {"startup_s": s, "prefix_caching": bool, "runs": [{"tokens": [[ids] per request], "trace": [D3 trace records]}]}

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so one engine.step() is one
scheduler step and "arrive" is exact: request r is added before step `arrive`.
"""
import json
import os
import sys
import tempfile
import time


def run_batch(engine, SamplingParams, requests, trace_path):
    start = os.path.getsize(trace_path) if os.path.exists(trace_path) else 0
    out, pending, step = {}, sorted(range(len(requests)), key=lambda r: requests[r].get("arrive", 0)), 0
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]].get("arrive", 0) <= step:
            r = pending.pop(0)
            sp = SamplingParams(temperature=0.0, max_tokens=requests[r]["max_tokens"], ignore_eos=True)
            engine.add_request(str(r), {"prompt_token_ids": requests[r]["prompt"]}, sp)
        for o in engine.step():
            if o.finished:
                out[int(o.request_id)] = list(o.outputs[0].token_ids)
        step += 1
        if step > 100000:
            raise RuntimeError("the engine did not finish")
    trace = []
    if os.path.exists(trace_path):
        with open(trace_path) as f:
            f.seek(start)
            trace = [json.loads(line) for line in f if line.strip()]
    return {"tokens": [out[r] for r in range(len(requests))], "trace": trace}


def main(spec_path, out_path):
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    trace_path = os.path.join(tempfile.mkdtemp(prefix="d3k-vllm-"), "trace.jsonl")
    os.environ["D3K_VLLM_TRACE"] = trace_path
    from vllm import LLM, SamplingParams
    kw = dict(dtype=spec.get("dtype", "float32"), enforce_eager=spec.get("eager", True),
              max_model_len=spec.get("max_model_len", 512), skip_tokenizer_init=True,
              tensor_parallel_size=spec.get("tp", 1), seed=0)
    if spec.get("overrides"):
        kw["hf_overrides"] = spec["overrides"]
    if spec.get("num_blocks"):
        kw["num_gpu_blocks_override"] = spec["num_blocks"]
    if spec.get("block_size"):
        kw["block_size"] = spec["block_size"]
    if spec.get("max_num_seqs"):
        kw["max_num_seqs"] = spec["max_num_seqs"]
    t = time.perf_counter()
    llm = LLM(spec["model"], **kw)
    result = {"startup_s": time.perf_counter() - t, "runs": [],
              "prefix_caching": bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)}
    for requests in spec["runs"]:
        result["runs"].append(run_batch(llm.llm_engine, SamplingParams, requests, trace_path))
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
