"""What the cpu backend's int8 activation rounding costs: its logits against the float32 reference on the same
weights (the GGUF's values, dequantized exactly), on the embedded model or a GGUF file.

    python bench/cpu_accuracy.py [--gguf PATH] [--tokens 48] [--prompts 4]

Per prompt: the reference's greedy continuation (float32, full depth); the cpu backend teacher-forced on it
(largest logit error, top-1 agreement at every position) and free-running (tokens equal to the reference's,
first divergence). The reference in bfloat16, teacher-forced the same way, is printed beside it as a scale.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3kernels  # noqa: E402
from d3kernels.decoder import Decoder  # noqa: E402
from d3kernels.schedule import D3Schedule  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Name three rivers in Europe.",
           "Explain what a hash table is in one sentence.", "Count from one to ten in words.",
           "Who wrote Romeo and Juliet?"]


def teacher_forced(dec: Decoder, ids: list, want: list) -> list:
    """The logits [V] before each of `want`'s tokens, fed one by one after the prompt."""
    out = [dec.prefill(ids)[0].float().clone()]
    for t in want[:-1]:
        out.append(dec.step([t])[0].float().clone())
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="a .gguf file (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t0 = time.time()
    model = d3kernels.load_model(a.gguf, packed=True)
    ref32 = model.dequantized(torch.float32)
    ref16 = model.dequantized(torch.bfloat16)
    L = model.config.num_layers
    full = D3Schedule(L, alpha=1.0)
    S = 64 + a.tokens + 8
    r32 = Decoder(ref32, full, max_seq_len=S, backend="reference")
    r16 = Decoder(ref16, full, max_seq_len=S, backend="reference")
    cpu = Decoder(model, full, max_seq_len=S, backend="cpu")
    tok = model.tokenizer
    rows = []
    for p in PROMPTS[: a.prompts]:
        ids = tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False))["input_ids"] if tok.chat_template else tok(p)["input_ids"]
        ids = ids[:64]
        want = [int(t) for t in r32.generate(ids, max_new_tokens=a.tokens, ignore_eos=True).tokens[0]]
        l32 = teacher_forced(r32, ids, want)
        res = {"prompt": p}
        for name, dec in (("cpu", cpu), ("reference_bf16", r16)):
            lx = teacher_forced(dec, ids, want)
            err = max((x - y).abs().max().item() for x, y in zip(lx, l32))
            agree = sum(int(x.argmax() == y.argmax()) for x, y in zip(lx, l32)) / len(l32)
            res[name] = {"max_logit_error": err, "teacher_forced_top1": agree}
        got = [int(t) for t in cpu.generate(ids, max_new_tokens=a.tokens, ignore_eos=True).tokens[0]]
        same = [x == y for x, y in zip(got, want)]
        res["cpu"]["greedy_equal_tokens"] = sum(same) / len(same)
        res["cpu"]["first_divergence"] = same.index(False) if False in same else None
        res["logit_scale"] = max(x.abs().max().item() for x in l32)
        rows.append(res)
        print(json.dumps(res), flush=True)
    summary = {"model": model.source, "tokens": a.tokens, "prompts": len(rows), "seconds": round(time.time() - t0, 1),
               "cpu_max_logit_error": max(r["cpu"]["max_logit_error"] for r in rows),
               "bf16_max_logit_error": max(r["reference_bf16"]["max_logit_error"] for r in rows),
               "cpu_teacher_forced_top1": sum(r["cpu"]["teacher_forced_top1"] for r in rows) / len(rows),
               "bf16_teacher_forced_top1": sum(r["reference_bf16"]["teacher_forced_top1"] for r in rows) / len(rows),
               "cpu_greedy_equal_tokens": sum(r["cpu"]["greedy_equal_tokens"] for r in rows) / len(rows)}
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
