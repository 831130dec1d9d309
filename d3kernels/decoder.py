"""The single-request decoder (docs/design.md section 4): prefill at full depth, then one decode step per
token that launches kernels only for the schedule's kept layers.

The device state (cache, buffers, graphs, positions) is a d3kernels.step.StepCore; this module keeps the
request: how many rows, the D3 step index, the tokens each row's cache holds, and generation with EOS,
stop strings and streaming. A decode step is `core.run(core.plan([i] * batch))`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .checks import check_sampling, token_column, token_rows
from .model import Model
from .schedule import D3Schedule
from .speculative import speculate
from .step import StepCore
from .stops import StopStrings


@dataclass
class Generation:
    """Result of Decoder.generate.

    tokens: LongTensor [B, n] of new tokens (-1 after a row finished).
    layers: the kept-layer tuple of each step (step 0 is the prompt pass).
    finished: per row, "eos", "stop" or "length".
    timings: prefill_s, decode_s, tokens_per_s (host clock, for people, not benchmarks).
    """
    tokens: torch.Tensor
    layers: list
    finished: list
    timings: dict = field(default_factory=dict)
    speculation: Optional[dict] = None      # speculative=k: rounds, drafted, accepted, acceptance, layer passes

    @property
    def mean_layers(self) -> float:
        return sum(len(k) for k in self.layers) / max(1, len(self.layers))


def _timings(prefill_s: float, decode_s: float, steps: int) -> dict:
    """Generation.timings of a run of `steps` tokens (the first comes from the prompt pass)."""
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "tokens_per_s": (steps - 1) / decode_s if steps > 1 and decode_s > 0 else float("nan")}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Decoder:
    """D3 decoding over a loaded Model.

    Args:
        model: a d3kernels Model (load_model()).
        schedule: a D3Schedule over model.config.num_layers layers; default D3Schedule(L) (the defaults
            live in D3Schedule).
        max_batch, max_seq_len: size of the static KV cache.
        backend: "auto" | "cuda" | "triton" | "reference" for the decode ops.
        fill: what skipped layers leave in the cache: "mask" | "project" | "copy".
        cuda_graphs: capture one CUDA graph per plan key (CUDA only; default on unless D3K_CUDA_GRAPHS=0).
        log: callable(str) for progress lines (cache size, graph capture), or None.
        page_size, num_pages: a paged cache (d3kernels.cache.PagedKVCache; a full pool raises PoolFull);
            None: the contiguous cache [L, B, H_kv, S, D].
    """

    def __init__(self, model: Model, schedule: Optional[D3Schedule] = None, max_batch: int = 1,
                 max_seq_len: int = 2048, backend: str = "auto", fill: str = "mask",
                 cuda_graphs: Optional[bool] = None, log=None, page_size: Optional[int] = None,
                 num_pages: Optional[int] = None):
        self.schedule = schedule if schedule is not None else D3Schedule(model.config.num_layers)
        self.core = StepCore(model, self.schedule, max_batch, max_seq_len, backend, fill, cuda_graphs, log,
                             page_size, num_pages)
        self.model, self.cfg, self.fill = model, model.config, fill
        self.device, self.dtype, self.backend = model.device, model.dtype, self.core.backend
        self.batch = 0              # rows of the current request
        self.i = 0                  # D3 step index of the token the next step generates
        self.prefilled = []         # per row: the tokens the last prefill fed
        self._conv = None           # per row: the conversation of the last generate()/stream()
        self._pending = False       # the token buffer holds tokens sampled from the logits, not yet fed

    @property
    def cache(self):
        return self.core.cache

    @property
    def ops(self):
        """The backend module the steps call; assign a wrapper to observe every op call."""
        return self.core.ops

    @ops.setter
    def ops(self, value) -> None:
        self.core.ops = value

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the current request: clear the depth mask, positions and step index."""
        self.core.reset()
        self.batch, self.i, self._conv, self._pending = 0, 0, None, False

    def snapshot(self) -> dict:
        """Copies of the request state (cache, positions, tokens held, step index, last logits), for
        restore(): e.g. to score many schedules after one prompt pass."""
        return {**self.core.state(), "batch": self.batch, "i": self.i}

    def restore(self, state: dict) -> torch.Tensor:
        """Go back to a snapshot() taken from this decoder; returns the logits [B, V] it held."""
        self.core.load_state(state)
        self.batch, self.i, self._conv, self._pending = state["batch"], state["i"], None, False
        return self.core.logits[: self.batch]

    def set_schedule(self, schedule: D3Schedule) -> None:
        """Use another schedule over the same layers from the next step on (graphs are cached per plan key,
        so they stay valid)."""
        if schedule.num_layers != self.cfg.num_layers:
            raise ValueError(f"schedule is for {schedule.num_layers} layers, the model has {self.cfg.num_layers}")
        self.schedule = self.core.schedule = schedule

    def stats(self) -> dict:
        """Backend, cache bytes, CUDA graphs captured, their memory pool and capture time, op calls."""
        return self.core.stats()

    @property
    def lengths(self) -> list:
        """Per row of the request, the positions its cache holds."""
        return list(self.core.lengths[: self.batch])

    @property
    def history(self) -> list:
        """Per row of the request, the token ids whose K/V the cache holds, in position order."""
        return self.core.history(range(self.batch))

    @property
    def conversation(self) -> Optional[list]:
        """Per row, the token ids of the conversation so far (prompts and generated tokens, the last
        generated one included), as kept by generate()/stream(); None after prefill()/step()/decode()."""
        return None if self._conv is None else [list(c) for c in self._conv]

    # ------------------------------------------------------------------ feeding
    def prefill(self, input_ids, continue_: bool = False) -> torch.Tensor:
        """Run prompts at full depth. Returns logits [B, V] of each row's last position.

        input_ids: LongTensor [B, T] / [T], or a list of token-id lists (lengths may differ).
        continue_=False starts a new request (the cache is cleared). continue_=True appends row b's
        tokens after the positions its cache holds (same B as the current request): earlier turns are
        not recomputed, and at each layer the new positions attend only to the earlier positions that
        layer holds (kv_valid). Either way the D3 step index restarts: the next step() is step 1.
        """
        rows = token_rows(input_ids, self.cfg.vocab, self.device)
        if continue_:
            if self.batch == 0:
                raise RuntimeError("continue_=True needs a request to continue: prefill or generate first")
            if len(rows) != self.batch:
                raise ValueError(f"continue_=True: the request has {self.batch} rows, got {len(rows)} prompts")
            self.core.check_fit([n + len(r) for n, r in zip(self.lengths, rows)], 0)
        else:
            self.core.check_fit([len(r) for r in rows], 0)
        self._conv = None
        return self._feed(rows, continue_)

    def continue_with(self, histories, new_tokens: int = 0) -> torch.Tensor:
        """The conversation primitive: make row b's cache hold histories[b] (token-id lists) and return the
        logits [B, V] of each row's last token. Each row keeps the longest common prefix of what its cache
        holds (history) and histories[b], leaving at least the last token to feed, and prefills the rest at
        full depth (attending at each layer to the positions that layer holds); with nothing to keep, or
        another number of rows, it is a new request. new_tokens: positions to leave room for (checked before
        anything changes). The D3 step index restarts. self.prefilled gets the tokens fed per row."""
        rows = token_rows(histories, self.cfg.vocab, self.device)
        held = self.history if len(rows) == self.batch else [[]] * len(rows)
        keep = [min(common_prefix(h, r), len(r) - 1) for h, r in zip(held, rows)]
        self.core.check_fit([len(r) for r in rows], new_tokens)
        if not any(keep):
            return self._feed(rows, False)
        for b, n in enumerate(keep):
            self.core.truncate(b, n)
        return self._feed([r[n:] for r, n in zip(rows, keep)], True)

    def _feed(self, rows: list, continued: bool) -> torch.Tensor:
        """Prefill rows (checked to fit) into rows 0..B-1: a new request, or continued after what they hold."""
        if not continued:
            self.reset()
        logits = self.core.admit(range(len(rows)), rows, continued)
        self.batch, self.i, self.prefilled, self._pending = len(rows), 1, [len(r) for r in rows], False
        return logits

    def truncate(self, lengths: Sequence[int]) -> None:
        """Cut row b's cache back to its first lengths[b] positions (0 <= lengths[b] <= what it holds): the
        positions after are masked (kv_valid = 0) and the next prefill(continue_=True) or step() writes
        there. For callers that manage their own tokens (an engine rewinding a request)."""
        if len(lengths) != self.batch:
            raise ValueError(f"expected {self.batch} lengths (one per row), got {len(lengths)}")
        held = self.lengths
        for b, n in enumerate(lengths):
            if not 0 <= n <= held[b]:
                raise ValueError(f"row {b}: length {n} outside [0, {held[b]}]")
        for b, n in enumerate(lengths):
            self.core.truncate(b, n)
        self._conv, self._pending = None, False

    # ------------------------------------------------------------------ decode
    def step(self, tokens) -> torch.Tensor:
        """Feed one token per row (the previous step's output) and return logits [B, V].

        Runs only schedule.kept_layers(i) for this step's index i, writes K/V at each row's position, then
        advances positions and i. The returned tensor is a static buffer, overwritten by the next step.
        """
        if self.batch == 0:
            raise RuntimeError("step() before prefill(): start a request with prefill(input_ids)")
        self.core.tokens[: self.batch].copy_(token_column(tokens, self.batch, self.cfg.vocab, self.device))
        self._conv = None
        return self._step()

    def _step(self) -> torch.Tensor:
        """One uniform decode step of the request's rows from the token buffer (a plan whose rows share
        step index i); advances i."""
        logits = self.core.run(self.core.plan([self.i] * self.batch))
        self.i, self._pending = self.i + 1, False
        return logits[: self.batch]

    def decode(self, n: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Run n decode steps after prefill() with no host sync; returns the device tensor [B, n]
        of tokens T_1..T_n. T_0, the first token fed, is sampled from the logits of the last prefill() or
        step() (after decode() it is decode()'s last token, sampled but not yet fed). No EOS handling:
        for throughput measurement and callers that check stops themselves."""
        if self.batch == 0:
            raise RuntimeError("decode() before prefill(): start a request with prefill(input_ids)")
        B = range(self.batch)
        check_sampling(temperature, top_k, top_p)
        # every position the n steps write: "cache overflow" or (paged) PoolFull before any step runs
        self.cache.reserve({b: self.core.lengths[b] + n for b in B})
        self._conv = None
        out = torch.empty(self.batch, n, dtype=torch.int64, device=self.device)
        if not self._pending:
            self.core.sample(B, temperature, top_k, top_p, generator)
        for k in range(n):
            self._step()
            out[:, k].copy_(self.core.sample(B, temperature, top_k, top_p, generator))
        self._pending = True
        return out

    def _request(self, input_ids, max_new_tokens, temperature, top_k, top_p, stop, continue_) -> tuple:
        """A generation request's checked arguments: (each row's token ids, with the conversation first when
        continue_; the stop strings)."""
        rows = token_rows(input_ids, self.cfg.vocab, self.device)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops and self.model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        if continue_:
            if self._conv is None:
                raise RuntimeError("continue_=True continues the conversation of this decoder's last generate() "
                                   "or stream() (run to its end); after prefill()/step()/decode() use "
                                   "prefill(ids, continue_=True)")
            if len(rows) != len(self._conv):
                raise ValueError(f"continue_=True: the conversation has {len(self._conv)} rows, got {len(rows)}")
            rows = [c + r for c, r in zip(self._conv, rows)]
        return rows, stops

    # ------------------------------------------------------------------ generation
    def stream(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: Optional[int] = None, ignore_eos: bool = False,
               stop: Optional[Sequence[str]] = None, continue_: bool = False,
               reuse_prefix: bool = False) -> Iterator[list]:
        """Generate as a generator: yields the list of B new token ids (-1 for finished rows) per step.

        continue_=False: a new request (the cache and step index are reset).
        continue_=True: the next turn of this decoder's last generate()/stream(): row b's conversation
        (see .conversation) continues with input_ids[b]; only the new tokens (and the last generated
        one) are prefilled, and the D3 step index restarts.
        reuse_prefix=True: input_ids are each row's whole conversation; what the cache already holds of it
        is kept (continue_with). After the loop, self.last holds the Generation.
        """
        rows, stops = self._request(input_ids, max_new_tokens, temperature, top_k, top_p, stop, continue_)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        t0 = time.perf_counter()
        if continue_ or reuse_prefix:
            self.continue_with(rows, max_new_tokens)
        else:
            self.core.check_fit([len(r) for r in rows], max_new_tokens)
            self._feed(rows, False)
        B, eos = len(rows), set() if ignore_eos else set(self.cfg.eos_token_ids)
        conv, out = [list(r) for r in rows], torch.full((B, max_new_tokens), -1, dtype=torch.int64)
        watch = StopStrings(self.model.tokenizer, stops, B) if stops else None
        layers, finished, t_prefill = [], [None] * B, None
        for n in range(max_new_tokens):
            layers.append(self.schedule.kept_layers(self.i if n > 0 else 0))
            if n > 0:
                self._step()
            toks = self.core.sample(range(B), temperature, top_k, top_p, gen).tolist()   # the one sync per step
            self._pending = True
            t_prefill = time.perf_counter() - t0 if t_prefill is None else t_prefill
            for b in range(B):
                if finished[b] is not None:
                    toks[b] = -1
                    continue
                out[b, n] = toks[b]
                conv[b].append(toks[b])
                if toks[b] in eos:
                    finished[b] = "eos"
                elif watch is not None and watch.add(b, toks[b]):
                    finished[b] = "stop"
            self._conv = conv
            yield toks
            if all(f is not None for f in finished):
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        decode_s, steps = time.perf_counter() - t0 - t_prefill, len(layers)
        self.last = Generation(out[:, :steps], layers, [f or "length" for f in finished],
                               _timings(t_prefill, decode_s, steps))

    def generate(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Optional[int] = None, ignore_eos: bool = False,
                 stop: Optional[Sequence[str]] = None, on_token=None, continue_: bool = False,
                 reuse_prefix: bool = False, speculative: Optional[int] = None,
                 draft: Optional[D3Schedule] = None) -> Generation:
        """Generate up to max_new_tokens per row; returns a Generation.

        input_ids: LongTensor [B, T] / [T], or a list of B token-id lists of any lengths.
        on_token: optional callable(list of B ids) called as tokens arrive (streaming; with speculative,
            callable(per row, the tokens so far) once per round).
        continue_, reuse_prefix: continue a conversation in the same cache (see stream()).
        speculative=k: lossless D3 (d3kernels/speculative.py): k tokens drafted per round at the depth of
            `draft` (default: this decoder's schedule), verified at full depth; greedy gives full-depth greedy
            decoding's tokens, sampling its distribution (stop strings, continue_ and reuse_prefix too).
        """
        if speculative is not None:
            rows, stops = self._request(input_ids, max_new_tokens, temperature, top_k, top_p, stop, continue_)
            gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
            tokens, finished, s = speculate(self, rows, max_new_tokens, speculative, draft, frozenset(
                () if ignore_eos else self.cfg.eos_token_ids), on_token, temperature, top_k, top_p, gen,
                continued=continue_ or reuse_prefix, stops=stops)
            self._conv = [r + [t for t in o if t >= 0] for r, o in zip(rows, tokens.tolist())]
            n = tokens.shape[1]
            self.last = Generation(tokens, [tuple(range(self.cfg.num_layers))] * n, [f or "length" for f in finished],
                                   _timings(s["prefill_s"], s["decode_s"], n), s)
            return self.last
        for toks in self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop,
                                continue_, reuse_prefix):
            if on_token is not None:
                on_token(toks)
        return self.last
