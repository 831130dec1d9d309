"""D3 inside Hugging Face `generate()`.

    out = model.generate(**inputs, custom_generate=d3kernels.hf.generate, d3_alpha=0.995, max_new_tokens=64)

`generate` is the decoding loop that transformers calls through
`custom_generate=`: transformers prepares the inputs, the logits processors
and the stopping criteria as usual, then hands them to this loop, which runs
D3 with a d3kernels Decoder on the same model instead of the model's forward.
The custom_generate/ folder at the repository root wraps `hub_generate`, the
same loop behind the Hub's `custom_generate="<repo or folder>"` interface.

What the loop honours, as plain `generate()` does: the logits processors
(temperature, top-k, top-p, repetition penalty, min new tokens, bad words,
...), the stopping criteria (max length, EOS, stop strings, max time, custom
ones), greedy or multinomial sampling (the global torch RNG, like plain
generate), `num_return_sequences`, `attention_mask` with left or right padding
(padding is stripped per row: each row's prompt fills positions 0..len-1 of
its own cache row), `streamer`, and `return_dict_in_generate` with
`output_scores` / `output_logits` (a GenerateDecoderOnlyOutput whose
`sequences` are the input ids, padding included, followed by the new tokens).

Multi-turn: with `return_dict_in_generate=True` the output's `cache` (`past_key_values`) is a D3KCache, a
handle on the conversation held in d3kernels' KV cache on the device (nothing is copied). Passing it back
with `input_ids` = the whole conversation so far plus the new message continues it: per row, the longest
common prefix of the cached conversation and the new input (padding stripped) is kept, and only the rest
is prefilled (at full depth, as Decoder.generate(..., continue_=True) does), so earlier turns are not
recomputed. `D3KCache()` can also be created empty and passed to the first call; it is updated in place,
like a transformers DynamicCache. d3kernels keeps one KV cache per model, so a handle is only valid
until the next generate() call on that model that does not continue it: reusing a stale handle (or one
from another model, another batch size, another d3_fill / d3_backend) raises an error before anything
runs; start again without past_key_values. Other cache objects (DynamicCache, ...) are rejected.

D3 settings: keyword arguments d3_alpha, d3_start, d3_tail, d3_order, d3_fill,
d3_backend, d3_decay_start, or a dict `d3={"alpha": ..., ...}` given to
generate() or set on the generation config (`generation_config.d3`).
Keyword arguments win over the dict; unset values take the library's defaults
(D3Schedule's, fill="mask", backend="auto").

The model's weights are converted once into d3kernels' fused layout and kept
on the model (`model.d3kernels_memory` reports the bytes). The fused wqkv and
w_gate_up rows and the per-layer stacks are copies: they cannot share storage
with the separate HF q/k/v, gate/up and per-layer weights. The embedding,
final norm and lm_head are shared, not copied. `release(model)` frees them.
"""
from __future__ import annotations

import copy
import functools
import logging
import sys
import weakref
from typing import Optional

import torch

from . import backends
from .cache import fmt_bytes
from .decoder import Decoder
from .model import Model, load_model
from .ops import FILL_MODES
from .schedule import DEFAULTS, D3Schedule

logger = logging.getLogger(__name__)

_STATE_ATTR = "_d3kernels_state"
_D3_KEYS = ("alpha", "start", "tail", "order", "fill", "backend", "decay_start", "speculative")
_SEQ_ROUND = 64            # the cached Decoder's max_seq_len grows in steps of this many positions
# model kwargs that generate() itself prepares for a forward pass; the loop derives what it needs from
# attention_mask and ignores the rest (positions come from the mask, the cache is d3kernels')
_PREPARED_KWARGS = ("attention_mask", "position_ids", "logits_to_keep", "use_cache", "cache", "past_key_values",
                    "cache_position")


# --------------------------------------------------------------------------- weights, cached on the model

class _State:
    """What d3kernels keeps on a transformers model: the converted Model, a fingerprint of the HF
    parameters it was converted from, and the Decoder of the last call (reused while it fits)."""

    def __init__(self, model: Model, key: tuple, memory: dict):
        self.model, self.key, self.memory = model, key, memory
        self.decoder: Optional[Decoder] = None
        self.epoch = 0          # +1 per call that runs: a D3KCache is valid while it holds the current one


def _fingerprint(hf_model) -> tuple:
    """Changes when a parameter is replaced, moved or updated in place (its version counter)."""
    return tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in hf_model.parameters())


def _weight_memory(m: Model, hf_model) -> dict:
    """Bytes of the converted weights: `copied` are new storage, `shared` alias the HF parameters."""
    hf_storages = {p.untyped_storage().data_ptr() for p in hf_model.parameters()}
    w = m.weights
    seen, copied, shared = set(), 0, 0
    for t in (w.embed, w.final_norm, w.lm_head, w.attn_norm, w.wqkv, w.bqkv, w.wo, w.mlp_norm, w.w_gate_up,
              w.w_down):
        if t is None:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        n = t.untyped_storage().nbytes()
        if ptr in hf_storages:
            shared += n
        else:
            copied += n
    return {"weights_copied_bytes": copied, "weights_shared_bytes": shared, "kv_cache_bytes": 0}


def converted_model(hf_model) -> Model:
    """The d3kernels Model of a transformers Llama / Mistral / Qwen2 model, converted on first use and
    cached on the model (converted again if its parameters change). Its tokenizer is None."""
    state = getattr(hf_model, _STATE_ATTR, None)
    key = _fingerprint(hf_model)
    if state is not None and state.key == key:
        return state.model
    dtype = next(hf_model.parameters()).dtype
    m = load_model(hf_model, device=hf_model.device, dtype=dtype)
    memory = _weight_memory(m, hf_model)
    state = _State(m, key, memory)
    object.__setattr__(hf_model, _STATE_ATTR, state)     # plain attribute: not a submodule, not in state_dict
    object.__setattr__(hf_model, "d3kernels_memory", memory)
    logger.warning(
        "d3kernels: converted %s for D3 once (cached on the model): %s of fused weights on %s. The fused "
        "wqkv / w_gate_up rows and per-layer stacks are copies (they cannot share storage with the HF q/k/v, "
        "gate/up and per-layer weights); embed, final norm and lm_head (%s) are shared. "
        "d3kernels.hf.release(model) frees them.", type(hf_model).__name__,
        fmt_bytes(memory["weights_copied_bytes"]), m.device, fmt_bytes(memory["weights_shared_bytes"]))
    return m


def release(hf_model) -> None:
    """Drop the converted weights and the KV cache that d3kernels keeps on a transformers model."""
    if getattr(hf_model, _STATE_ATTR, None) is not None:
        object.__setattr__(hf_model, _STATE_ATTR, None)
        object.__setattr__(hf_model, "d3kernels_memory", None)


def _capacity(m: Model, seq_len: int, at_least: int = 0) -> int:
    """Cache length for a request of seq_len positions: rounded up, but within a sliding window."""
    S = -(-max(seq_len, at_least) // _SEQ_ROUND) * _SEQ_ROUND
    window = m.config.sliding_window
    if window is not None and seq_len <= window:
        S = min(S, window)
    return max(S, seq_len, 2)


def _decoder(hf_model, schedule: D3Schedule, fill: str, backend: str, rows: int, seq_len: int) -> Decoder:
    """The Decoder cached on the model, rebuilt when the batch size, fill or backend differ or the
    request does not fit its cache. Its schedule is swapped per call (CUDA graphs are kept per kept-layer set)."""
    m = converted_model(hf_model)
    state = getattr(hf_model, _STATE_ATTR)
    dec = state.decoder
    resolved = backends.resolve(backend, m.device, m.dtype, m.config.head_dim)
    # a step computes every cache row, so the batch must match; a longer cache only costs memory
    if (dec is None or dec.fill != fill or dec.backend != resolved or dec.cache.max_batch != rows
            or dec.cache.max_seq_len < seq_len):
        S = _capacity(m, seq_len, dec.cache.max_seq_len if dec is not None else 0)
        state.decoder = None                                   # free the old cache before allocating
        dec = Decoder(m, schedule, max_batch=rows, max_seq_len=S, backend=backend, fill=fill, log=logger.info)
        state.decoder = dec
        state.memory["kv_cache_bytes"] = dec.cache.nbytes
    else:
        dec.set_schedule(schedule)
    return dec


class D3KCache:
    """What `past_key_values` / `cache` is for d3kernels.hf.generate: a handle on the conversation that
    d3kernels' KV cache holds for a model (the K/V stay in the Decoder on the device; nothing is copied).

    Returned as the output's `cache` (`past_key_values`) when return_dict_in_generate=True, or created
    empty, `D3KCache()`, and passed to the first call; a call that gets it updates it in place. Passed
    back with input_ids = the conversation so far plus the new tokens, the call keeps, per row, the
    longest common prefix of `conversation` and the new input (padding stripped) and prefills only the
    rest. d3kernels keeps one KV cache per model: the handle is valid until another generate() call
    on the model runs without it; using it after that raises an error.

    conversation: per row, the token ids so far (input without padding, then the generated tokens up to
        the row's last one, its EOS included; pads after it are not part of it); None before first use.
    prefilled: per row, how many tokens the last call prefilled: on a continued turn the new ones, plus
        the last generated token of the turn before (it was generated but not fed yet).
    """

    def __init__(self):
        self._model_ref = None      # weakrefs to the transformers model and its d3kernels state
        self._state_ref = None
        self._epoch = None
        self._conv = None
        self._fill = self._backend = None
        self.prefilled = None

    @property
    def conversation(self) -> Optional[list]:
        return None if self._conv is None else [list(c) for c in self._conv]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions the longest row's cache holds (its conversation without the last generated token,
        which has not been fed yet); 0 before first use."""
        return 0 if self._conv is None else max(len(c) - 1 for c in self._conv)

    def __len__(self) -> int:
        return 0 if self._conv is None else len(self._conv)

    def __repr__(self) -> str:
        if self._state_ref is None:
            return "D3KCache(unused)"
        return f"D3KCache(rows={len(self)}, lengths={[len(c) for c in self._conv or []]}, fill={self._fill!r})"

    def __getattr__(self, name):
        # reached only for attributes it does not have: what a model's forward asks of a transformers Cache
        raise AttributeError(f"D3KCache has no attribute {name!r}: it is a handle on d3kernels' KV cache, for "
                             "model.generate(..., custom_generate=d3kernels.hf.generate) only, not a transformers "
                             "Cache for the model's own forward")

    def _check(self, hf_model, rows: int, fill: str, backend: str) -> Optional[_State]:
        """The state this handle continues (None: unused, start a new request); raises if it is stale.
        Changes nothing."""
        if self._state_ref is None:
            return None
        state = self._state_ref()
        again = "start again without past_key_values (and pass the whole conversation as input_ids)"
        if self._model_ref() is not hf_model:
            raise ValueError("past_key_values is a D3KCache made by generate() on another model; " + again)
        if state is None or getattr(hf_model, _STATE_ATTR, None) is not state or state.key != _fingerprint(hf_model):
            raise ValueError("past_key_values is a D3KCache whose KV cache is gone (d3kernels.hf.release(model), or "
                             "the model's weights changed since); " + again)
        if self._conv is None:
            raise ValueError("past_key_values is a D3KCache whose last generate() call did not finish; " + again)
        if self._epoch != state.epoch or state.decoder is None or state.decoder.batch != len(self._conv):
            raise ValueError("past_key_values is a stale D3KCache: a later generate() call on this model replaced "
                             "its conversation (d3kernels keeps one KV cache per model; continue from the cache of "
                             "the latest call); " + again)
        if rows != len(self._conv):
            raise ValueError(f"past_key_values holds a conversation of {len(self._conv)} rows, input_ids has {rows}: "
                             "pass every row's conversation so far plus its new tokens, or " + again)
        if fill != self._fill or backend != self._backend:
            raise ValueError(f"past_key_values was filled with d3_fill={self._fill!r}, backend {self._backend!r}; "
                             f"this call asks for d3_fill={fill!r}, backend {backend!r}: continue with the same "
                             "ones, or " + again)
        return state


def _user_cache(model_kwargs) -> Optional[D3KCache]:
    """The D3KCache passed as past_key_values / cache, or None; other caches are rejected."""
    for name in ("cache", "past_key_values"):
        c = model_kwargs.get(name)
        if isinstance(c, D3KCache):
            return c
        if c is not None and (getattr(c, "_is_user_defined", False) or isinstance(c, (tuple, list))):
            raise ValueError(f"a cache passed to generate() (past_key_values / cache) must be a "
                             f"d3kernels.hf.D3KCache, got {type(c).__name__}: d3kernels.hf.generate keeps its own "
                             "KV cache (pass the D3KCache of an earlier call's output to continue its conversation)")
    return None


# --------------------------------------------------------------------------- arguments

def _d3_settings(generation_config, d3: Optional[dict], explicit: dict) -> dict:
    """D3 settings: explicit d3_* keyword arguments > the d3= dict > generation_config.d3 > defaults."""
    out = {"alpha": DEFAULTS["alpha"], "start": DEFAULTS["start"], "tail": DEFAULTS["tail"],
           "order": DEFAULTS["skip_order"], "decay_start": DEFAULTS["decay_start"], "fill": "mask", "backend": "auto",
           "speculative": None}
    for where, block in (("generation_config.d3", getattr(generation_config, "d3", None)), ("d3", d3)):
        if block is None:
            continue
        if not isinstance(block, dict):
            raise TypeError(f"{where} must be a dict with keys from {_D3_KEYS}, got {type(block).__name__}")
        unknown = sorted(set(block) - set(_D3_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; allowed: {list(_D3_KEYS)}")
        out.update({k: v for k, v in block.items() if v is not None})
    out.update({k: v for k, v in explicit.items() if v is not None})
    if out["fill"] not in FILL_MODES:
        raise ValueError(f"d3_fill must be one of {FILL_MODES}, got {out['fill']!r}")
    if out["order"] == "calibrated":
        raise ValueError("d3_order='calibrated' needs calibration prompts: compute the order with "
                         "d3kernels.calibrate_skip_order(d3kernels.hf.converted_model(model), prompts=[token id "
                         "lists], start=..., tail=...) and pass the list as d3_order")
    return out


def _generate_frame_locals() -> dict:
    """The locals of transformers' generate() when it called this loop as `custom_generate=`.

    transformers (5.x) hands a custom_generate callable only the keyword arguments its signature adds
    to the standard sampling loop's, so `streamer` and `assistant_model`, which generate() takes as
    named parameters, never reach the callable. They are read from the calling generate() frame,
    identified by its `custom_generate` local being this loop.
    """
    f = sys._getframe(2)
    for _ in range(4):
        if f is None:
            break
        if f.f_code.co_name == "generate" and "custom_generate" in f.f_code.co_varnames:
            loc = f.f_locals
            cg = loc.get("custom_generate")
            if isinstance(cg, functools.partial):
                cg = cg.func
            if cg is generate:
                return loc
        f = f.f_back
    return {}


def _check_supported(hf_model, generation_config, synced_gpus, model_kwargs, caller: dict) -> None:
    """Reject what this loop cannot do, before anything runs."""
    gc = generation_config
    if getattr(hf_model.config, "is_encoder_decoder", False):
        raise ValueError("d3kernels.hf.generate supports decoder-only Llama / Mistral / Qwen2 models, "
                         f"not the encoder-decoder {type(hf_model).__name__}")
    if caller.get("assistant_model") is not None or getattr(gc, "prompt_lookup_num_tokens", None) is not None \
            or getattr(gc, "assistant_early_exit", None) is not None:
        raise ValueError("assisted / speculative decoding (assistant_model, prompt_lookup_num_tokens, "
                         "assistant_early_exit) is not supported with d3kernels.hf.generate")
    if (gc.num_beams or 1) > 1:
        raise ValueError(f"beam search (num_beams={gc.num_beams}) is not supported with d3kernels.hf.generate: "
                         "use num_beams=1 (greedy or do_sample=True)")
    if (getattr(gc, "num_beam_groups", None) or 1) > 1 or getattr(gc, "force_words_ids", None) is not None \
            or getattr(gc, "constraints", None) is not None:
        raise ValueError("group / constrained beam search is not supported with d3kernels.hf.generate")
    if getattr(gc, "penalty_alpha", None) is not None and (gc.penalty_alpha or 0) > 0:
        raise ValueError("contrastive search (penalty_alpha) is not supported with d3kernels.hf.generate")
    if getattr(gc, "dola_layers", None) is not None:
        raise ValueError("DoLa decoding (dola_layers) is not supported with d3kernels.hf.generate")
    if getattr(gc, "guidance_scale", None) not in (None, 1, 1.0):
        raise ValueError("classifier-free guidance (guidance_scale) is not supported with d3kernels.hf.generate: "
                         "its unconditional pass would run the full HF model, not D3")
    if gc.output_attentions or gc.output_hidden_states:
        raise ValueError("output_attentions / output_hidden_states are not supported with d3kernels.hf.generate "
                         "(the D3 loop runs fused kernels, not the HF layers); output_scores and output_logits are")
    if synced_gpus:
        raise ValueError("synced_gpus (DeepSpeed ZeRO-3 / FSDP) is not supported with d3kernels.hf.generate")
    _user_cache(model_kwargs)
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("inputs_embeds is not supported with d3kernels.hf.generate: pass input_ids")
    extra = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _PREPARED_KWARGS)
    if extra:
        raise ValueError(f"d3kernels.hf.generate does not take the model arguments {extra}")
    if gc.max_length is None:
        raise ValueError("generation_config.max_length is not set: pass max_new_tokens or max_length")


def _rows(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list:
    """Per-row prompt token lists, padding removed (the mask's zeros), for any padding side."""
    ids = input_ids.tolist()
    if attention_mask is None:
        return ids
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool().tolist()
    rows = [[t for t, keep in zip(r, m) if keep] for r, m in zip(ids, mask)]
    empty = [b for b, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"rows {empty} of attention_mask are all zeros: every prompt needs at least one token")
    return rows


# --------------------------------------------------------------------------- the loop

def generate(model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
             generation_config=None, synced_gpus: bool = False, streamer=None,
             d3_alpha: Optional[float] = None, d3_start: Optional[float] = None, d3_tail: Optional[int] = None,
             d3_order=None, d3_fill: Optional[str] = None, d3_backend: Optional[str] = None,
             d3_decay_start: Optional[int] = None, d3_speculative: Optional[int] = None, d3: Optional[dict] = None,
             **model_kwargs):
    """The D3 decoding loop for `model.generate(..., custom_generate=d3kernels.hf.generate)`.

    transformers calls it after its usual preparation, with:
        input_ids: LongTensor [B, T] (rows already repeated for num_return_sequences), padded as given.
        logits_processor, stopping_criteria: the lists generate() built from its arguments.
        generation_config: the merged GenerationConfig (do_sample, max_length, pad/eos tensors, output_*).
        model_kwargs: attention_mask [B, T] (None when there is no padding) and what generate() prepares
            for a forward pass (ignored: d3kernels keeps its own cache and per-row positions).
    D3 settings: d3_alpha, d3_start, d3_tail, d3_order ("bottom" | "top" | list of layers), d3_fill
    ("mask" | "project" | "copy"), d3_backend ("auto" | "reference" | "triton" | "cuda"), d3_decay_start,
    d3_speculative=k (lossless D3: the D3 schedule drafts k tokens per round, full depth verifies them, and
    the output is plain greedy generate()'s; greedy, no logits processors, no cache handle), or the same keys
    in a dict `d3` / `generation_config.d3`.

    past_key_values / cache: a D3KCache (from an earlier call's output, or D3KCache() to start one):
        input_ids are then the conversation so far plus the new tokens; per row, the part that the cached
        conversation shares with them is kept and only the rest is prefilled. Checked before anything runs.

    Returns what plain generate() returns: LongTensor [B, T + n] (input ids, then the new tokens; rows
    that finish early are filled with pad_token_id), or GenerateDecoderOnlyOutput with sequences,
    scores, logits and `cache` (`past_key_values`), a D3KCache to continue the conversation with (the
    one passed in, updated; None with use_cache=False and none passed), when return_dict_in_generate=True.
    """
    from transformers.generation import GenerateDecoderOnlyOutput, LogitsProcessorList, StoppingCriteriaList

    gc = generation_config if generation_config is not None else model.generation_config
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    caller = _generate_frame_locals()
    if streamer is None:
        streamer = caller.get("streamer")
    # --- everything is checked before anything runs
    _check_supported(model, gc, synced_gpus, model_kwargs, caller)
    settings = _d3_settings(gc, d3, {"alpha": d3_alpha, "start": d3_start, "tail": d3_tail, "order": d3_order,
                                     "fill": d3_fill, "backend": d3_backend, "decay_start": d3_decay_start,
                                     "speculative": d3_speculative})
    schedule = D3Schedule(model.config.num_hidden_layers, alpha=settings["alpha"], start=settings["start"],
                          tail=settings["tail"], skip_order=settings["order"],
                          decay_start=settings["decay_start"])
    cfg = model.config
    resolved = backends.resolve(settings["backend"], model.device, next(model.parameters()).dtype,
                                getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    rows = _rows(input_ids, model_kwargs.get("attention_mask"))
    B, T = input_ids.shape
    max_new = gc.max_length - T
    if max_new < 1:
        raise ValueError(f"max_length={gc.max_length} leaves no room after the {T}-token input")
    pad = getattr(gc, "_pad_token_tensor", None)      # set by generate()'s preparation
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if has_eos and pad is None:
        raise ValueError("an EOS stopping criterion needs pad_token_id to fill finished rows: pass pad_token_id")
    bad = sorted({t for r in rows for t in r if not 0 <= t < cfg.vocab_size})
    if bad:
        raise ValueError(f"input_ids has token ids outside [0, {cfg.vocab_size}) where attention_mask is 1: {bad[:5]}")
    if settings["speculative"] is not None:
        return _speculative(model, input_ids, rows, settings, schedule, gc, logits_processor, max_new, pad,
                            has_eos, model_kwargs, streamer)
    handle = _user_cache(model_kwargs)
    state = handle._check(model, B, settings["fill"], resolved) if handle is not None else None
    seq_len = max(len(r) for r in rows) + max_new      # positions a row may reach, continued or not
    if state is not None:                              # continue the handle's conversation in its cache
        dec = state.decoder
        dec.set_schedule(schedule)
        if seq_len > dec.cache.max_seq_len:           # grow-only, the conversation kept (at least doubled)
            dec.core.grow(max_seq_len=_capacity(dec.model, seq_len, 2 * dec.cache.max_seq_len))
            state.memory["kv_cache_bytes"] = dec.cache.nbytes
    else:
        dec = _decoder(model, schedule, settings["fill"], settings["backend"], B, seq_len)
    state = getattr(model, _STATE_ATTR)
    state.epoch += 1                                   # from here on the cache's content changes
    want = bool(gc.return_dict_in_generate)
    if handle is None and want and gc.use_cache is not False:
        handle = D3KCache()                            # returned as the output's cache, as generate() does
    if handle is not None:                             # bound now, valid once the loop has finished
        handle._model_ref, handle._state_ref = weakref.ref(model), weakref.ref(state)
        handle._epoch, handle._conv = state.epoch, None
        handle._fill, handle._backend = dec.fill, dec.backend

    # --- the loop: the same steps as transformers' sampling loop, with D3 logits
    scores = () if want and gc.output_scores else None
    raw_logits = () if want and gc.output_logits else None
    device = input_ids.device
    unfinished = torch.ones(B, dtype=torch.long, device=device)
    if pad is not None:
        pad = pad.to(device)
    # a new request, or per row the longest prefix the cache holds of the input, and the rest prefilled
    logits = dec.continue_with(rows) if state is not None else dec.prefill(rows)
    if handle is not None:
        handle.prefilled = list(dec.prefilled)
    generated = torch.zeros(B, dtype=torch.long, device=device)   # per row: tokens before it finished
    while True:
        next_logits = logits.to(copy=True, dtype=torch.float32, device=device)
        next_scores = logits_processor(input_ids, next_logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits,)
        if gc.do_sample:
            next_tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_scores, dim=-1)
        if has_eos:
            next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        generated += unfinished
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            break
        # finished rows still step (their outputs are ignored); feed them a valid id
        logits = dec.step(torch.where(unfinished.bool(), next_tokens, torch.zeros_like(next_tokens)))
    if streamer is not None:
        streamer.end()
    if handle is not None:
        new = input_ids[:, T:].tolist()
        handle._conv = [r + new[b][:n] for b, (r, n) in enumerate(zip(rows, generated.tolist()))]
    if want:
        field = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, **{field: handle})
    return input_ids


def _speculative(model, input_ids, rows, settings, schedule, gc, logits_processor, max_new, pad, has_eos,
                 model_kwargs, streamer):
    """d3_speculative=k: lossless D3 (d3kernels.speculative) with greedy generate()'s output layout."""
    from .speculative import speculate
    if gc.do_sample or len(logits_processor) or gc.return_dict_in_generate or streamer is not None or \
            _user_cache(model_kwargs) is not None:
        raise ValueError("d3_speculative is greedy: do_sample=False, no logits processors (repetition penalty, "
                         "bad words, ...), no return_dict_in_generate, streamer or cache")
    B, T = input_ids.shape
    dec = _decoder(model, schedule, settings["fill"], settings["backend"], B, max(len(r) for r in rows) + max_new)
    eos = getattr(gc, "_eos_token_tensor", None)
    eos = frozenset(eos.reshape(-1).tolist()) if has_eos and eos is not None else frozenset()
    getattr(model, _STATE_ATTR).epoch += 1             # the cache's content changes: handles go stale
    tokens, _, _ = speculate(dec, rows, max_new, settings["speculative"], schedule, eos)
    new = tokens.to(input_ids.device)
    if pad is not None:
        new = torch.where(new < 0, pad.to(input_ids.device), new)
    return torch.cat([input_ids, new], dim=-1)


def hub_generate(model, *args, **kwargs):
    """The whole of `generate()` with the D3 loop: transformers' preparation, then `generate` above.

    This is what custom_generate/generate.py calls when transformers loads the folder
    (`model.generate(..., custom_generate="<repo or folder>", trust_remote_code=True)`); it takes
    generate()'s arguments. Stop strings work here with `tokenizer=` (transformers does not hand a
    tokenizer to a custom_generate callable, so they are turned into a stopping criterion first).
    """
    from transformers.generation import StopStringCriteria, StoppingCriteriaList

    if kwargs.get("assistant_model") is not None:
        raise ValueError("assisted / speculative decoding (assistant_model) is not supported with the d3kernels "
                         "custom_generate")
    if kwargs.get("negative_prompt_ids") is not None:
        raise ValueError("negative_prompt_ids (classifier-free guidance) is not supported with the d3kernels "
                         "custom_generate")
    tokenizer = kwargs.pop("tokenizer", None)
    stop = kwargs.pop("stop_strings", None)
    gc = kwargs.get("generation_config")
    if stop is None and gc is not None and getattr(gc, "stop_strings", None):
        stop = gc.stop_strings
        gc = copy.deepcopy(gc)
        gc.stop_strings = None
        kwargs["generation_config"] = gc
    if stop:
        if tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer: pass tokenizer= to generate()")
        criteria = StoppingCriteriaList(list(kwargs.get("stopping_criteria") or []))
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop))
        kwargs["stopping_criteria"] = criteria
    return type(model).generate(model, *args, custom_generate=generate, **kwargs)
