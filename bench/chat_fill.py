"""How far the fill modes depart from full depth over a multi-turn chat (docs/quality.md, "Chat").

A full-depth greedy conversation (one reply per user message, the chat template applied to the whole
conversation at each turn) is the transcript. Each setting then replays exactly that transcript in one
cache: every turn's new prompt tokens are prefilled at full depth (continuing the cache), and the
full-depth reply is teacher-forced through D3 decode steps. Per turn it reports the top-1 agreement with
the full-depth reply and the perplexity of that reply. Within the first turn the fill modes are
identical (kept sets are nested); from the second turn on, the prefill and the decode steps attend at
every layer to the earlier replies' positions, which "mask" leaves out where a reply skipped the layer
and "project" / "copy" fill in.

    python bench/chat_fill.py [--model PATH] [--alphas 0.998,0.99] [--max-new-tokens 64] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from d3kernels import D3Schedule, Decoder, load_model
from d3kernels.generate import template_ids

MESSAGES = ["Tell me about the city of Paris.", "What should I visit there first?",
            "How do I get there from the airport?"]


def _shared(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def transcript(model, messages, max_new: int) -> list:
    """The full-depth greedy conversation: [(prefill start, prefill tokens, reply tokens)] per turn."""
    tok = model.tokenizer
    dec = Decoder(model, D3Schedule(model.config.num_layers, alpha=1.0), max_seq_len=2048, backend="reference")
    eos = set(model.config.eos_token_ids)
    chat, X, turns = [], [], []
    for m in messages:
        chat.append({"role": "user", "content": m})
        full = template_ids(tok, chat)
        start = min(_shared(X, full), max(0, len(X) - 1))   # the cache holds X[:-1]
        if X:
            dec.truncate([start])
            logits = dec.prefill([full[start:]], continue_=True)
        else:
            logits = dec.prefill([full])
        reply = []
        while True:
            t = int(logits[0].argmax())
            reply.append(t)
            if t in eos or len(reply) == max_new:
                break
            logits = dec.step([t])
        turns.append((start, full[start:], reply))
        X = full + reply
        chat.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    return turns


def replay(model, turns, schedule, fill: str, d3_turns=None) -> list:
    """Teacher-force the transcript under `schedule`; per turn {agreement, ppl, mean_layers}.
    d3_turns: the turns that decode under `schedule` (default all); the others decode at full depth."""
    full = D3Schedule(model.config.num_layers, alpha=1.0)
    dec = Decoder(model, schedule, max_seq_len=2048, backend="reference", fill=fill)
    out = []
    for k, (start, prompt, reply) in enumerate(turns):
        dec.set_schedule(schedule if d3_turns is None or k in d3_turns else full)
        schedule_k = dec.schedule
        if k:
            dec.truncate([start])
            logits = dec.prefill([prompt], continue_=True)
        else:
            logits = dec.prefill([prompt])
        agree, nll, layers = 0, 0.0, []
        for j, t in enumerate(reply):
            lp = torch.log_softmax(logits[0].double(), -1)
            agree += int(lp.argmax()) == t
            nll -= float(lp[t])
            if j + 1 < len(reply):
                layers.append(len(schedule_k.kept_layers(dec.i)))
                logits = dec.step([t])
        out.append({"agreement": agree / len(reply), "ppl": math.exp(nll / len(reply)),
                    "mean_layers": sum(layers) / max(1, len(layers)), "tokens": len(reply)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--alphas", default="0.998,0.99")
    p.add_argument("--start", type=float, default=0.5)
    p.add_argument("--tail", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model = load_model(a.model) if a.model else load_model()
    t0 = time.perf_counter()
    turns = transcript(model, MESSAGES, a.max_new_tokens)
    L = model.config.num_layers
    rows = [("full depth", "-", replay(model, turns, D3Schedule(L, alpha=1.0), "mask"))]
    for alpha in (float(x) for x in a.alphas.split(",")):
        for fill in ("mask", "project", "copy"):
            sched = D3Schedule(L, alpha=alpha, start=a.start, tail=a.tail)
            rows.append((f"alpha {alpha}", fill, replay(model, turns, sched, fill)))
            print(f"  {alpha} {fill} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        # control: D3 in the measured turn only, earlier turns at full depth (their cache is complete)
        sched = D3Schedule(L, alpha=alpha, start=a.start, tail=a.tail)
        rows.append((f"alpha {alpha}", "earlier turns at full depth",
                     [replay(model, turns[: k + 1], sched, "mask", d3_turns={k})[k] for k in range(len(turns))]))
    n = len(turns)
    print(f"{model.source}: {n} turns, replies of {[len(r) for _, _, r in turns]} tokens, "
          f"prompts of {[len(q) for _, q, _ in turns]} new tokens; start={a.start}, tail={a.tail}")
    print("| setting | fill | " + " | ".join(f"turn {k + 1} agree / ppl (layers)" for k in range(n)) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in range(n)) + " |")
    for name, fill, res in rows:
        cells = [f"{r['agreement'] * 100:.0f}% / {r['ppl']:.2f} ({r['mean_layers']:.1f})" for r in res]
        print(f"| {name} | {fill} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model.source, "messages": MESSAGES, "turns": [list(t) for t in turns],
                       "rows": [{"setting": s, "fill": fl, "turns": r} for s, fl, r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
