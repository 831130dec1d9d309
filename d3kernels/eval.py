"""D3 quality against full depth on a real model (docs/design.md section 7): `d3kernels eval`.

For every setting (alpha, start, tail, skip order) of a grid, and a batch of B
prompts with N new tokens each:

* the full-depth greedy continuation y[b, 0..N-1] is the reference (computed once);
* teacher-forced top-1 agreement: feed y[b, i-1] at step i, so the D3 model
  (kept_layers(i)) predicts token i from the reference prefix; report the
  fraction of positions whose argmax equals y[b, i];
* teacher-forced cost: the perplexity of y under the D3 schedule, relative to
  its perplexity at full depth;
* free-running greedy agreement: D3 decodes on its own; position-by-position
  agreement with y and the first divergence step;
* ideal speedup (bytes ratio, d3kernels.speed) and, on a GPU, measured tokens/s.

Only decode steps i = 1..N-1 are scored (step 0 is the shared full-depth
prompt pass), and a row stops being scored after the reference's first EOS.
Teacher-forced and free-running rows share one batch of 2B rows, so a
setting costs one prefill and N - 1 decode steps.

This module is the library part; the `eval` and `calibrate` commands are in
d3kernels.cli, which imports it (never the other way round).
"""
from __future__ import annotations

import datetime
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

from .calibrate import Prompt, builtin_prompts, calibrate_skip_order, encode_prompts
from .decoder import Decoder
from .model import Model
from .schedule import D3Schedule
from .speed import ideal_speedup

ORDERS = ("bottom", "top", "calibrated")
DEFAULT_ALPHAS = (1.0, 0.999, 0.998, 0.995, 0.99)
DEFAULT_STARTS = (0.25, 0.5)
DEFAULT_TAILS = (1,)
DEFAULT_ORDERS = ORDERS
DEFAULT_NUM_PROMPTS = 8
DEFAULT_TOKENS = 32


def check_grid(alphas, starts, tails, orders, max_new_tokens) -> tuple:
    """Validate and normalize the grid; raises ValueError with the allowed values."""
    def nonempty(name, xs):
        xs = list(xs)
        if not xs:
            raise ValueError(f"{name} must list at least one value")
        return xs
    alphas = [float(a) for a in nonempty("alphas", alphas)]
    for a in alphas:
        if not 0.0 < a <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {a}")
    starts = [float(s) for s in nonempty("starts", starts)]
    for s in starts:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"start must be in [0, 1], got {s}")
    tails = nonempty("tails", tails)
    for t in tails:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"tail must be an integer >= 0, got {t!r}")
    orders = nonempty("orders", orders)
    for o in orders:
        if o not in ORDERS:
            raise ValueError(f"unknown skip order {o!r}; choose from {', '.join(ORDERS)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an integer >= 2 (token 0 comes from the full-depth prompt "
                         f"pass, so D3 is scored from token 1 on), got {max_new_tokens!r}")
    def dedup(xs):
        return list(dict.fromkeys(xs))
    return dedup(alphas), dedup(starts), dedup(tails), dedup(orders), max_new_tokens


class _Runner:
    """One Decoder over 2B rows: rows [0, B) are teacher-forced, rows [B, 2B) run free."""

    def __init__(self, model: Model, rows: list, max_new_tokens: int, backend: str):
        self.model, self.rows, self.N, self.B = model, rows, max_new_tokens, len(rows)
        self.dec = Decoder(model, D3Schedule(model.config.num_layers, alpha=1.0), max_batch=2 * self.B,
                           max_seq_len=max(len(r) for r in rows) + max_new_tokens, backend=backend)
        self._saved = None

    def _prefill(self) -> torch.Tensor:
        """dec.prefill of the 2B rows. The prompt pass runs at full depth whatever the schedule, so
        the first call's cache and positions are saved and later calls restore them (the reference
        backend's prefill is slow on a CPU). Returns the logits [2B, V]."""
        dec = self.dec
        if self._saved is None:
            logits = dec.prefill(self.rows + self.rows)
            self._saved = dec.snapshot()
            return logits
        return dec.restore(self._saved)

    def run(self, schedule: D3Schedule, ref: Optional[torch.Tensor] = None) -> tuple:
        """Decode N tokens per row under `schedule`.

        ref: LongTensor [B, N], the tokens fed to the teacher-forced rows (token
        i - 1 at step i); None feeds every row its own greedy token (the reference run).
        Returns (pred [2B, N] greedy tokens per row and step, logp [B, N] float64
        log-probability of the target token on the teacher-forced rows; the target
        is ref, or the row's own greedy token when ref is None).
        """
        dec, B, N = self.dec, self.B, self.N
        dec.set_schedule(schedule)
        pred = torch.empty(2 * B, N, dtype=torch.int64)
        logp = torch.empty(B, N, dtype=torch.float64)
        logits = self._prefill()
        for i in range(N):
            if i > 0:
                tf_in = pred[:B, i - 1] if ref is None else ref[:, i - 1]
                logits = dec.step(torch.cat([tf_in, pred[B:, i - 1]]))
            pred[:, i] = logits.argmax(-1).cpu()
            target = pred[:B, i] if ref is None else ref[:, i]
            lp = torch.log_softmax(logits[:B].double(), dim=-1)
            logp[:, i] = lp.gather(1, target[:, None].to(lp.device))[:, 0].cpu()
        return pred, logp


def _score_mask(ref: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """bool [B, N]: decode steps 1..N-1 up to and including each row's first reference EOS."""
    B, N = ref.shape
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        row = ref[b].tolist()
        end = next((i for i, t in enumerate(row) if t in eos), N - 1)
        mask[b, 1: end + 1] = True
    return mask


def _tokens_per_s(dec: Decoder, schedule: D3Schedule, row: list, n: int) -> float:
    """Batch-1 decode throughput of n steps on a GPU, timed with CUDA events after a warm-up pass."""
    dec.schedule = schedule
    for _ in range(2):
        dec.prefill([row])
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.decode(n)
        b.record()
        b.synchronize()
    return n / (a.elapsed_time(b) / 1e3)


def evaluate(model: Model, prompts: Optional[Sequence[Prompt]] = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
             starts: Sequence[float] = DEFAULT_STARTS, tails: Sequence[int] = DEFAULT_TAILS,
             orders: Sequence[str] = DEFAULT_ORDERS, max_new_tokens: int = DEFAULT_TOKENS,
             backend: str = "auto", progress: bool = True, measure_speed: Optional[bool] = None,
             calibration_prompts: Optional[Sequence[Prompt]] = None) -> dict:
    """Measure D3 quality against full depth over a grid of settings.

    Args:
        model: a loaded Model.
        prompts: B strings (chat template applied) or token-id lists; default:
            the first DEFAULT_NUM_PROMPTS built-in prompts.
        alphas, starts, tails: grid values (see D3Schedule); orders: names from
            ORDERS ("calibrated" uses calibrate_skip_order and its user cache).
        max_new_tokens: N, tokens per prompt (>= 2).
        measure_speed: time batch-1 decoding per setting; default: on a CUDA model.
        calibration_prompts: prompts for the "calibrated" order; default: the
            held-out built-in calibration prompts, or `prompts` for a model
            without a tokenizer.
    Returns:
        dict with "results" (one dict per setting: order, start, tail, alpha,
        skip_order, mean_layers, ideal_speedup, tf_agreement, ppl, ppl_full,
        ppl_increase (relative: 0.05 = +5%), fr_agreement, first_divergence
        (mean over rows), first_divergence_rows, tokens_per_s), "reference"
        (full-depth perplexity and tokens) and run metadata.
    """
    alphas, starts, tails, orders, N = check_grid(alphas, starts, tails, orders, max_new_tokens)
    if prompts is None:
        prompts = builtin_prompts()[:DEFAULT_NUM_PROMPTS]
    rows = encode_prompts(model, prompts)
    if calibration_prompts is None and model.tokenizer is None:
        calibration_prompts = rows
    cfg = model.config
    L = cfg.num_layers
    if measure_speed is None:
        measure_speed = model.device.type == "cuda"
    t0 = time.perf_counter()

    # settings, validated before anything runs
    settings = []
    calibrated = {}
    for order in orders:
        for start in starts:
            for tail in tails:
                D3Schedule(L, alpha=1.0, start=start, tail=tail)       # clear error for an impossible core
                if order == "calibrated" and (start, tail) not in calibrated:
                    calibrated[(start, tail)] = calibrate_skip_order(
                        model, calibration_prompts, start=start, tail=tail, backend=backend)
                skip = calibrated[(start, tail)] if order == "calibrated" else order
                for alpha in alphas:
                    sched = D3Schedule(L, alpha=alpha, start=start, tail=tail, skip_order=skip)
                    settings.append((order, start, tail, alpha, sched))

    runner = _Runner(model, rows, N, backend)
    B = len(rows)
    ref_pred, ref_logp = runner.run(D3Schedule(L, alpha=1.0))
    ref = ref_pred[:B].clone()
    mask = _score_mask(ref, cfg.eos_token_ids)
    if not mask.any():
        raise ValueError("the full-depth continuations end at once (EOS at token 0 or 1): nothing to score; "
                         "use other prompts or more max_new_tokens")
    nll_full = -ref_logp[mask].mean().item()
    prompt_len = round(sum(len(r) for r in rows) / B)

    from tqdm import tqdm
    done = {}            # kept-layer sequence -> measured metrics (settings that run the same layers share them)
    speed = {}
    speed_dec = Decoder(model, D3Schedule(L, alpha=1.0), max_batch=1, max_seq_len=len(rows[0]) + N,
                        backend=backend) if measure_speed else None
    results = []
    for order, start, tail, alpha, sched in tqdm(settings, desc="d3kernels eval", unit="setting", file=sys.stderr,
                                                  disable=not progress, dynamic_ncols=True):
        key = tuple(sched.kept_layers(i) for i in range(N))
        if key not in done:
            pred, logp = runner.run(sched, ref)
            tf_match = pred[:B] == ref
            fr_match = pred[B:] == ref
            first_div = []
            for b in range(B):
                idx = mask[b].nonzero()[:, 0].tolist()
                first_div.append(next((i for i in idx if not fr_match[b, i]), idx[-1] + 1 if idx else 1))
            nll = -logp[mask].mean().item()
            done[key] = {
                "tf_agreement": tf_match[mask].double().mean().item(),
                "ppl": math.exp(nll), "ppl_full": math.exp(nll_full),
                "ppl_increase": math.exp(nll - nll_full) - 1.0,
                "fr_agreement": fr_match[mask].double().mean().item(),
                "first_divergence": sum(first_div) / B, "first_divergence_rows": first_div,
            }
            if measure_speed:
                speed[key] = _tokens_per_s(speed_dec, sched, rows[0], N - 1)
        layers = [sched.num_kept(i) for i in range(N)]
        results.append({
            "order": order, "start": start, "tail": tail, "alpha": alpha, "skip_order": list(sched.skip_order),
            "mean_layers": sum(layers[1:]) / (N - 1),
            "ideal_speedup": ideal_speedup(cfg, layers, prompt_len, model.weights.wqkv.element_size()),
            **done[key], "tokens_per_s": speed.get(key)})

    return {
        "model": cfg.name, "source": str(model.source), "num_layers": L, "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""), "backend": runner.dec.backend, "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "prompts": B, "max_new_tokens": N,
        "mean_prompt_len": prompt_len, "scored_positions": int(mask.sum()),
        "reference": {"ppl": math.exp(nll_full), "tokens": ref.tolist()},
        "calibrated_orders": {f"start={s},tail={t}": o for (s, t), o in calibrated.items()},
        "unique_runs": len(done), "wall_s": time.perf_counter() - t0, "results": results,
    }


# --------------------------------------------------------------------------- reporting

def best_setting(report: dict, min_tf_agreement: float = 0.95, max_ppl_increase: float = 0.05) -> Optional[dict]:
    """The result with the highest ideal speedup whose teacher-forced agreement and perplexity
    increase meet the thresholds (ties: higher agreement), or None."""
    ok = [r for r in report["results"] if r["alpha"] < 1.0 and r["tf_agreement"] >= min_tf_agreement
          and r["ppl_increase"] <= max_ppl_increase]
    return max(ok, key=lambda r: (round(r["ideal_speedup"], 4), r["tf_agreement"]), default=None)


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}" if abs(x) < 100 else f"{100 * x:+.1e}"


def format_table(report: dict, markdown: bool = False) -> str:
    """The results as a fixed-width (or markdown) table, sorted by order, start, tail, alpha."""
    head = ["order", "start", "tail", "alpha", "layers", "ideal x", "TF agree", "PPL +%", "FR agree", "1st div"]
    speed = any(r["tokens_per_s"] is not None for r in report["results"])
    if speed:
        head.append("tok/s")
    rows = []
    for r in sorted(report["results"], key=lambda r: (r["order"], r["start"], r["tail"], -r["alpha"])):
        row = [r["order"], f"{r['start']:g}", str(r["tail"]), f"{r['alpha']:g}", f"{r['mean_layers']:.2f}",
               f"{r['ideal_speedup']:.3f}", f"{100 * r['tf_agreement']:.1f}%", _pct(r["ppl_increase"]),
               f"{100 * r['fr_agreement']:.1f}%", f"{r['first_divergence']:.1f}"]
        if speed:
            row.append("-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def plot(report: dict, path: str) -> Optional[str]:
    """Draw teacher-forced agreement and perplexity increase against ideal speedup to a PNG, one
    curve per (order, start, tail), colored by order. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"bottom": "tab:blue", "top": "tab:red", "calibrated": "tab:green"}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    curves = {}
    for r in report["results"]:
        curves.setdefault((r["order"], r["start"], r["tail"]), []).append(r)
    starts = sorted({k[1] for k in curves})
    tails = sorted({k[2] for k in curves})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (order, start, tail), rs in sorted(curves.items()):
        rs = sorted(rs, key=lambda r: r["ideal_speedup"])
        x = [r["ideal_speedup"] for r in rs]
        kw = dict(color=colors.get(order, "k"), linestyle=styles[starts.index(start) % len(styles)],
                  marker=markers[tails.index(tail) % len(markers)], markersize=4,
                  label=f"{order}, start={start:g}, tail={tail}")
        ax1.plot(x, [100 * r["tf_agreement"] for r in rs], **kw)
        ax2.plot(x, [100 * r["ppl_increase"] for r in rs], **kw)
    ax1.set_ylabel("teacher-forced top-1 agreement with full depth (%)")
    ax2.set_ylabel("perplexity increase of the full-depth continuation (%)")
    ax2.set_yscale("symlog", linthresh=1.0)
    for ax in (ax1, ax2):
        ax.set_xlabel("ideal speedup (bytes ratio)")
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"D3 on {report['model']} ({report['num_layers']} layers): {report['prompts']} prompts x "
                 f"{report['max_new_tokens']} tokens, greedy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
