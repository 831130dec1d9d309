"""The D3 model classes vLLM loads for D3LlamaForCausalLM, D3MistralForCausalLM and D3Qwen2ForCausalLM.

Each subclasses vLLM's own class (same weights, loader, attention layers and KV cache) and replaces only the
forward pass: the loop over the decoder layers runs the union of the batch's kept sets, in Python, outside
any compiled graph, so the depth is decided on every step. Under vLLM's torch.compile each decoder layer is
its own compiled graph (vLLM's piecewise backend, CUDA graphs inside the layer on a GPU), never the loop.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Optional

import numpy as np
import torch
import vllm

from . import check_vllm_version

check_vllm_version(vllm.__version__)        # before touching the internals below

from vllm.compilation.decorators import support_torch_compile  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.config import CUDAGraphMode  # noqa: E402
from vllm.forward_context import get_forward_context, is_forward_context_available  # noqa: E402
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM  # noqa: E402
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM  # noqa: E402
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model  # noqa: E402

from .. import engine  # noqa: E402
from . import TRACE_ENV, schedule_from_config  # noqa: E402

_LAYER_DYNAMIC = {"positions": 0, "hidden_states": 0, "residual": 0}


def _compiled_layer(cls):
    """A subclass of a vLLM decoder layer class that vLLM compiles on its own (one graph per layer)."""
    return support_torch_compile(dynamic_arg_dims=_LAYER_DYNAMIC)(type(f"D3{cls.__name__}", (cls,), {}))


D3LlamaDecoderLayer = _compiled_layer(LlamaDecoderLayer)
D3MistralDecoderLayer = _compiled_layer(MistralDecoderLayer)
D3Qwen2DecoderLayer = _compiled_layer(Qwen2DecoderLayer)


class D3Runtime:
    """The D3 state of one model instance: its schedule, the step indices of the batch about to run
    (set by the runner hook) and the counts of what ran."""

    def __init__(self, schedule):
        self.schedule = schedule
        self._steps: Optional[np.ndarray] = None
        self._pos: Optional[np.ndarray] = None
        self._chunk: Optional[np.ndarray] = None
        self.stats = Counter()          # forwards, layer_calls, tokens, token_layers, unplanned_forwards
        self.trace = os.environ.get(TRACE_ENV) or None

    def set_batch(self, steps: np.ndarray, positions: np.ndarray, chunk: np.ndarray) -> None:
        """The next forward's tokens (host arrays [T]): D3 step index (0: a prompt token), position, and
        how many tokens the token's request feeds in this forward."""
        self._steps, self._pos, self._chunk = steps, positions, chunk

    def _take(self, positions: torch.Tensor) -> np.ndarray:
        steps, pos, self._last_chunk = self._steps, self._pos, self._chunk
        self._steps = self._pos = self._chunk = None
        T = positions.shape[0]
        if steps is None:               # vLLM's warm-up and profiling runs: no requests, full depth
            self.stats["unplanned_forwards"] += 1
            self._last_chunk = None
            return np.zeros(T, dtype=np.int64)
        n = len(steps)
        if n > T:
            raise RuntimeError(f"d3kernels: the runner planned {n} tokens but the model got {T}")
        if positions.device.type == "cpu" and not np.array_equal(positions[:n].numpy(), pos):
            raise RuntimeError("d3kernels: the step indices computed from vLLM's input batch disagree with the "
                               "positions the model got; this vLLM release is not supported")
        if n < T:                       # padding (CUDA graphs): follows the union, adds no layer
            steps = np.concatenate([steps, np.full(T - n, steps.min() if n else 0, dtype=np.int64)])
        return steps

    def run(self, inner, input_ids, positions, inputs_embeds):
        """The decoder stack of `inner` (vLLM's LlamaModel / Qwen2Model) over the batch's kept layers:
        input_ids [T] (or inputs_embeds [T, d]), positions [T] -> final-normed hidden states [T, d]."""
        if is_forward_context_available() and get_forward_context().cudagraph_runtime_mode == CUDAGraphMode.FULL:
            raise RuntimeError("d3kernels: vLLM is capturing a full CUDA graph of a D3 model, which would freeze "
                               "its layer loop at one depth; only piecewise graphs (cudagraph_mode PIECEWISE) apply")
        steps = self._take(positions)
        uniq, inv = np.unique(steps, return_inverse=True)
        plan = engine.plan(self.schedule, [int(s) for s in uniq])
        h = inputs_embeds if inputs_embeds is not None else inner.embed_input_ids(input_ids)
        residual = None
        inv_t = torch.from_numpy(inv.reshape(-1)).to(h.device)
        called = []                     # the decoder layers this forward calls, in call order
        for l in plan.kept:
            col = plan.mask[l].bool()
            if bool(col.all()):
                h, residual = self._call(inner, l, called, positions, h, residual)
            else:                       # tokens that skip layer l pass (h, residual) through unchanged
                if residual is None:    # the stream is h + residual; 0 keeps it exact
                    residual = torch.zeros_like(h)
                keep = col.to(h.device)[inv_t][:, None]
                h2, r2 = self._call(inner, l, called, positions, h, residual)
                h, residual = torch.where(keep, h2, h), torch.where(keep, r2, residual)
        h, _ = inner.norm(h, residual)
        self._count(steps, plan, inv, called)
        return h

    def _call(self, inner, l: int, called: list, *args):
        """Call decoder layer l of `inner`, counting the call (stats["layer_calls"], the trace's "called")."""
        called.append(l)
        self.stats["layer_calls"] += 1
        return inner.layers[l](*args)

    def _count(self, steps: np.ndarray, plan, inv: np.ndarray, called: list) -> None:
        """Counts of one forward: its tokens, the layers it called, and the layers its tokens keep (the plan's
        mask column of each token's distinct step index)."""
        token_layers = int(plan.mask.sum(0).numpy()[inv].sum())
        self.stats["forwards"] += 1
        self.stats["tokens"] += len(steps)
        self.stats["token_layers"] += token_layers
        if self.trace:
            rec = {"tokens": len(steps), "step_min": int(steps.min()), "step_max": int(steps.max()),
                   "decode_tokens": int((steps > 0).sum()), "layer_calls": len(called), "called": called,
                   "token_layers": token_layers, "pid": os.getpid(),
                   # generated positions fed again in a multi-token chunk: a recompute after preemption
                   "recomputed": 0 if self._last_chunk is None else
                   int(((steps[:len(self._last_chunk)] > 0) & (self._last_chunk > 1)).sum())}
            with open(self.trace, "a") as f:
                f.write(json.dumps(rec) + "\n")


class _D3Forward:
    """The forward of every D3 class: the embeddings, then D3Runtime over the kept layers."""

    def _d3_init(self) -> None:
        # pipeline parallelism and bad d3_* fields were refused at startup (config.D3ModelConfig)
        self.d3 = D3Runtime(schedule_from_config(self.config))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.d3.run(self.model, input_ids, positions, inputs_embeds)


class D3LlamaForCausalLM(_D3Forward, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=D3LlamaDecoderLayer)
        self._d3_init()


class D3MistralForCausalLM(_D3Forward, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=D3MistralDecoderLayer)
        self._d3_init()


class _D3Qwen2Model(Qwen2Model):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=D3Qwen2DecoderLayer)


class D3Qwen2ForCausalLM(_D3Forward, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # Qwen2ForCausalLM builds its Qwen2Model by name: build ours in its place
        import vllm.model_executor.models.qwen2 as qwen2
        stock, qwen2.Qwen2Model = qwen2.Qwen2Model, _D3Qwen2Model
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            qwen2.Qwen2Model = stock
        self._d3_init()
