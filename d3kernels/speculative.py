"""Lossless D3: D3-depth drafts verified at full depth, so the output is full-depth decoding's (greedy:
the same tokens; sampling: the same distribution) (docs/design.md section 4.6).

Each round, per row: draft k tokens at D3 depth from the last verified token t (draft token j runs
draft.kept_layers(i + j), i the index of the row's next token, so later drafts are cheaper); then one
full-depth pass over t and the k drafts (a continued prefill that returns every position's logits, and
overwrites every layer's K/V at those positions); accept the longest prefix of drafts that equal the
full-depth argmax, plus the full-depth token at the first mismatch (or after the last draft). The cache
is cut back past the accepted positions. Rows accept different counts, so they move to different positions
and step indices; the plan handles that.

Sampling (temperature > 0) is standard speculative sampling: drafts are drawn from the draft's filtered
distribution q; draft j is accepted with probability min(1, p(d) / q(d)) (p: the full-depth distribution
at that position, filtered the same way), else the token is drawn from max(0, p - q), normalised, and the
round ends; after k accepted drafts a bonus token is drawn from p. The output is distributed as full-depth
sampling (Leviathan et al. 2023; Chen et al. 2023).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from .reference import filtered_probs
from .schedule import D3Schedule
from .stops import StopStrings


class _Pick:
    """Token choice: greedy (temperature 0) or sampling from the filtered distribution with a generator."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator):
        self.t, self.k, self.p, self.gen = temperature, top_k, top_p, generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return filtered_probs(logits.float(), self.t, self.k, self.p).double()

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.float().cpu(), 1, generator=self.gen))

    def first(self, logits: torch.Tensor) -> int:
        return int(logits.argmax()) if self.t <= 0 else self.draw(self.probs(logits[None])[0])

    def verify(self, drafts: list, q: list, logits: torch.Tensor) -> tuple:
        """(m accepted drafts, the token after them) from the full-depth logits [len(drafts) + 1, V]."""
        if self.t <= 0:
            g = logits.argmax(-1).tolist()
            m = 0
            while m < len(drafts) and drafts[m] == g[m]:
                m += 1
            return m, g[m]
        p = self.probs(logits).cpu()
        for j, d in enumerate(drafts):
            u = float(torch.rand((), generator=self.gen, dtype=torch.float64))
            if u < min(1.0, float(p[j, d] / q[j][d])):
                continue
            residual = torch.clamp(p[j] - q[j], min=0)
            return j, self.draw(residual / residual.sum())
        return len(drafts), self.draw(p[len(drafts)])


def speculate(dec, rows: list, max_new_tokens: int, k: int, draft: Optional[D3Schedule] = None,
              eos: frozenset = frozenset(), on_token=None, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, generator: Optional[torch.Generator] = None, continued: bool = False,
              stops: Sequence[str] = ()) -> tuple:
    """Speculative decoding of `rows` (token-id lists) on Decoder `dec`, greedy or (temperature > 0, with
    `generator`, a CPU torch.Generator) sampling. continued=False: a new request; True: `rows` are whole
    conversations and the cache keeps what it holds of them (Decoder.continue_with). stops: stop strings
    (matched on each new token's text, as Decoder.stream does). Returns (tokens [B, n] LongTensor with -1 after a
    row finished, finished per row, stats): stats counts rounds, drafted and accepted tokens, the draft's layer
    passes and the verify passes (tokens x L)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"speculative k (tokens drafted per round) must be an integer >= 1, got {k!r}")
    draft = draft or dec.schedule
    if draft.num_layers != dec.cfg.num_layers:
        raise ValueError(f"the draft schedule is for {draft.num_layers} layers, the model has {dec.cfg.num_layers}")
    core, L, S, B = dec.core, dec.cfg.num_layers, dec.cache.max_seq_len, len(rows)
    dec.core.check_fit([len(r) for r in rows], max_new_tokens)
    saved = core.schedule
    stats = {"rounds": 0, "drafted": 0, "accepted": 0, "draft_layer_passes": 0, "verify_layer_passes": 0}
    t0 = time.perf_counter()
    if continued:
        dec.continue_with(rows, max_new_tokens)        # keep what the cache holds, prefill the rest
    else:
        dec.prefill(rows)                              # a new request: full-depth prefill, its logits
    t_prefill = time.perf_counter() - t0
    out = [[] for _ in range(B)]
    finished = [None] * B
    watch = StopStrings(dec.model.tokenizer, stops, B) if stops else None
    pick = _Pick(temperature, top_k, top_p, generator)
    last = [pick.first(core.logits[b]) for b in range(B)]   # T_0, from the full-depth prompt pass

    def emit(b: int, toks: list) -> None:
        for t in toks:
            out[b].append(t)
            if t in eos:
                finished[b] = "eos"
                return
            if watch is not None and watch.add(b, t):
                finished[b] = "stop"
                return
            if len(out[b]) >= max_new_tokens:
                finished[b] = "length"
                return

    for b in range(B):
        emit(b, [last[b]])
    if on_token is not None:
        on_token([list(o) for o in out])
    core.schedule = draft
    try:
        while any(f is None for f in finished):
            live = [b for b in range(B) if finished[b] is None]
            n0 = list(core.lengths[:B])
            # drafts this round: bounded by what each live row may still emit and the cache's room
            kr = min([k] + [max_new_tokens - len(out[b]) - 1 for b in live] + [S - n0[b] - 1 for b in live])
            drafts, q = [[] for _ in range(B)], [[] for _ in range(B)]
            core.tokens[:B].copy_(torch.tensor(last, dtype=torch.int64))
            for j in range(kr):                        # D3-depth drafts, each row at its own step index
                steps = [len(out[b]) + j if finished[b] is None else None for b in range(B)]
                core.run(core.plan(steps))
                stats["draft_layer_passes"] += sum(len(draft.kept_layers(steps[b])) for b in live)
                if temperature <= 0:
                    toks = core.sample(range(B)).tolist()
                else:                                  # drawn from q, which the verification needs
                    probs = pick.probs(core.logits[:B]).cpu()
                    toks = [pick.draw(probs[b]) if b in live else 0 for b in range(B)]
                    for b in live:
                        q[b].append(probs[b])
                    core.tokens[:B].copy_(torch.tensor(toks, dtype=torch.int64))
                for b in live:
                    drafts[b].append(toks[b])
            # verify at full depth: t and the drafts, every position's logits, every layer's K/V rewritten
            for b in range(B):
                core.truncate(b, n0[b])
            feed = [[last[b]] + drafts[b] if b in live else [last[b]] for b in range(B)]
            logits = core.admit(range(B), feed, continued=True, every_position=True)
            stats["rounds"] += 1
            stats["verify_layer_passes"] += L * sum(len(feed[b]) for b in live)
            at = 0
            for b in range(B):
                g = logits[at:at + len(feed[b])]
                at += len(feed[b])
                if b not in live:
                    core.truncate(b, n0[b])            # a finished row keeps what it held
                    continue
                m, nxt = pick.verify(drafts[b], q[b], g)
                stats["drafted"] += kr
                stats["accepted"] += m
                core.truncate(b, n0[b] + m + 1)        # t and the m accepted drafts; the rest is cut back
                emit(b, drafts[b][:m] + [nxt])
                last[b] = nxt
            if on_token is not None:
                on_token([list(o) for o in out])
    finally:
        core.schedule = saved
    n = max(len(o) for o in out)
    tokens = torch.full((B, n), -1, dtype=torch.int64)
    for b, o in enumerate(out):
        tokens[b, : len(o)] = torch.tensor(o, dtype=torch.int64)
    stats["acceptance"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else float("nan")
    stats["prefill_s"], stats["decode_s"] = t_prefill, time.perf_counter() - t0 - t_prefill
    return tokens, finished, stats
