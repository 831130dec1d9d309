"""A calibrated skip order from the model's own information flow (docs/design.md section 1).

The D3 paper motivates depth decay with the cosine similarity between a layer's
input and output hidden states: a layer whose output points the same way as its
input changes the residual stream little, so it is the cheapest to skip.
`calibrate_skip_order` measures that similarity per layer on a few prompts,
during full-depth greedy decode steps (the steps D3 shortens), and orders the
flex layers most redundant (most similar) first. The result is an explicit
skip order for D3Schedule(skip_order=[...]).

Per-layer similarities are kept in a user cache (one JSON file per model
identity; see model.user_cache_dir()), so `d3kernels eval --orders calibrated` pays for
the calibration once per model.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from importlib import resources
from typing import Optional, Sequence, Union

import torch

from . import quant
from .model import Model, user_cache_dir
from .schedule import D3Schedule

Prompt = Union[str, Sequence[int]]

N_CALIBRATION_PROMPTS = 8     # the last 8 built-in prompts; `d3kernels eval` uses the first ones
CALIBRATION_TOKENS = 16


# --------------------------------------------------------------------------- prompts

def builtin_prompts() -> list:
    """The built-in prompt set (d3kernels/data/prompts.jsonl), as a list of strings."""
    text = resources.files("d3kernels").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def read_prompts(path: str) -> list:
    """Prompts from a file: JSONL with a "prompt" field per line, or plain text with one prompt per line.

    A file is read as JSONL when its name ends in .jsonl or its first non-blank
    line starts with "{". Blank lines are ignored. Raises ValueError if no prompt is found.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f.read().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"prompts file {path} is empty: give one prompt per line, or JSONL with a \"prompt\" field")
    if path.endswith(".jsonl") or lines[0].startswith("{"):
        prompts = []
        for n, ln in enumerate(lines, 1):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise ValueError(f"{path}: line {n} needs a non-empty string field \"prompt\"")
            prompts.append(rec["prompt"])
        return prompts
    return lines


def encode_prompts(model: Model, prompts: Sequence[Prompt]) -> list:
    """Token-id lists for prompts: strings go through encode_prompt (chat template), id lists pass through."""
    from .generate import encode_prompt
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or token-id lists")
    rows = []
    for p in prompts:
        if isinstance(p, str):
            rows.append(encode_prompt(model, p))
        else:
            rows.append([int(t) for t in p])
    return rows


# --------------------------------------------------------------------------- cache

def model_key(model: Model) -> str:
    """A short hash of the model's identity: its config, dtype and a fingerprint of some weights."""
    h = hashlib.sha256(repr(model.config).encode())
    h.update(str(model.dtype).encode())
    w = model.weights

    def values(t):        # packed weights fingerprint by their values: the same as their dequantized copy
        return quant.rows(t, torch.arange(8)) if quant.is_packed(t) and t.dim() == 2 else \
            t.dequantize() if quant.is_packed(t) else t

    for t in (values(w.embed)[:8, :64], values(w.wqkv)[:, :2, :64], values(w.w_down)[:, :2, :64],
              w.final_norm[:64]):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _prompts_key(rows: list, tokens: int) -> str:
    return hashlib.sha256(json.dumps([rows, tokens]).encode()).hexdigest()[:16]


def cache_path(model: Model) -> str:
    """The JSON file that holds this model's calibrations."""
    return os.path.join(user_cache_dir(), f"skip_order-{model_key(model)}.json")


def _load_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) and isinstance(data.get("entries"), dict) else {"entries": {}}
    except (OSError, ValueError):
        return {"entries": {}}


# --------------------------------------------------------------------------- measurement

class _Recorder:
    """Wraps a backend's ops and records each layer's input and output hidden states [B, d]
    (the h given to attn_block and the out written by mlp_block)."""

    def __init__(self, ops):
        self._ops = ops
        self.inputs, self.outputs = [], []

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def attn_block(self, out, h, *args):
        self.inputs.append(h.detach().float().clone())
        return self._ops.attn_block(out, h, *args)

    def mlp_block(self, out, h, *args):
        r = self._ops.mlp_block(out, h, *args)
        self.outputs.append(out.detach().float().clone())
        return r


def layer_similarity(model: Model, prompts: Optional[Sequence[Prompt]] = None,
                     max_new_tokens: int = CALIBRATION_TOKENS, backend: str = "auto") -> list:
    """Mean cosine similarity between each layer's input and output hidden state.

    Runs the prompts (batched) at full depth and greedily decodes max_new_tokens
    tokens; every decode step contributes one [B, d] input/output pair per layer.

    Args:
        prompts: strings (chat template applied) or token-id lists; default: the
            last N_CALIBRATION_PROMPTS built-in prompts.
    Returns:
        list of L floats, one per layer; near 1 means the layer barely changes
        the residual stream (redundant).
    """
    from .decoder import Decoder
    if prompts is None:
        prompts = builtin_prompts()[-N_CALIBRATION_PROMPTS:]
    if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an integer >= 2 for calibration, got {max_new_tokens!r}")
    rows = encode_prompts(model, prompts)
    L = model.config.num_layers
    dec = Decoder(model, D3Schedule(L, alpha=1.0), max_batch=len(rows),
                  max_seq_len=max(len(r) for r in rows) + max_new_tokens, backend=backend, cuda_graphs=False)
    rec = _Recorder(dec.ops)
    dec.ops = rec
    sims = torch.zeros(L, dtype=torch.float64)
    tokens = dec.prefill(rows).argmax(-1)
    for _ in range(max_new_tokens - 1):
        rec.inputs.clear()
        rec.outputs.clear()
        tokens = dec.step(tokens).argmax(-1)
        for l, (x, y) in enumerate(zip(rec.inputs, rec.outputs)):
            sims[l] += torch.nn.functional.cosine_similarity(x, y, dim=-1).double().mean()
    return (sims / (max_new_tokens - 1)).tolist()


def calibrate_skip_order(model: Model, prompts: Optional[Sequence[Prompt]] = None, start: float = 0.5,
                         tail: int = 1, max_new_tokens: int = CALIBRATION_TOKENS, cache: bool = True,
                         recompute: bool = False, backend: str = "auto", return_similarity: bool = False):
    """The flex layers [s, L - tail) ordered most redundant first, for D3Schedule(skip_order=...).

    Redundancy is layer_similarity() (input/output cosine similarity, higher =
    more redundant; ties keep the lower layer first). With cache=True the
    per-layer similarities are read from / written to the user cache
    (cache_path(model)), keyed by model identity, prompts and max_new_tokens;
    recompute=True measures again and overwrites the cached entry.

    Args:
        model: a loaded Model.
        prompts: strings or token-id lists; default: the last N_CALIBRATION_PROMPTS
            built-in prompts (held out from the default `d3kernels eval` prompts).
        start, tail: the schedule's core, as in D3Schedule.
    Returns:
        list[int], a permutation of the flex layers (plus the [L] similarities
        when return_similarity=True).
    """
    flex = D3Schedule(model.config.num_layers, alpha=1.0, start=start, tail=tail).flex_layers  # validates
    if prompts is None:
        prompts = builtin_prompts()[-N_CALIBRATION_PROMPTS:]
    rows = encode_prompts(model, prompts)
    key = _prompts_key(rows, max_new_tokens)
    path = cache_path(model)
    data = _load_cache(path) if cache else {"entries": {}}
    entry = None if recompute else data["entries"].get(key)
    if entry is not None and len(entry.get("similarity", [])) == model.config.num_layers:
        sims = entry["similarity"]
    else:
        sims = layer_similarity(model, rows, max_new_tokens, backend)
        if cache:
            data.update(model=model.config.name, source=str(model.source), dtype=str(model.dtype))
            data["entries"][key] = {"similarity": sims, "prompts": len(rows), "max_new_tokens": max_new_tokens,
                                    "date": datetime.datetime.now().isoformat(timespec="seconds")}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
    order = sorted(flex, key=lambda l: (-sims[l], l))
    return (order, sims) if return_similarity else order
