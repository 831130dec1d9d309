"""Startup checks of D3 models in vLLM, and the one runner hook that gives each token its D3 step index.

Imported by register() only, once vLLM is importable.
"""
from __future__ import annotations

import numpy as np
from vllm.config import CUDAGraphMode
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from . import PARAMS, config_keys, schedule_from_config

logger = init_logger("vllm.plugins.d3kernels")   # under "vllm": vLLM configures only its own loggers


class D3ModelConfig(VerifyAndUpdateConfig):
    """Runs when vLLM builds its config for a D3 architecture, before any engine process starts."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        hf = vllm_config.model_config.hf_config
        schedule = schedule_from_config(hf)          # a bad d3_* value fails here, naming it
        par = vllm_config.parallel_config
        if par.pipeline_parallel_size > 1:
            raise ValueError("D3 models do not support pipeline parallelism (pipeline_parallel_size > 1): a "
                             "token's depth is decided over the whole layer stack")
        if vllm_config.speculative_config is not None:
            raise ValueError("D3 models do not support speculative decoding in vLLM")
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching is not False:      # None: vLLM's default, filled in later
            # blocks written under D3 hold no real K/V at the layers their tokens skipped
            cache.enable_prefix_caching = False
            logger.info("d3kernels: prefix caching disabled for this D3 model (blocks written under D3 hold no "
                        "K/V for the layers their tokens skipped, so they must not be shared)")
        cudagraph_policy(vllm_config.compilation_config)
        logger.info(f"d3kernels: {vllm_config.model_config.architecture} runs {schedule}")


def cudagraph_policy(comp) -> None:
    """No full CUDA graphs for a D3 model: one would capture the layer loop at one depth. The loop stays
    in Python and each decoder layer is its own compiled graph (model.py), so piecewise graphs, inside the
    layers, are what may be captured. This hook runs before vLLM fills its optimization-level defaults
    (FULL_AND_PIECEWISE on a GPU), so an unset mode is set here; vLLM later drops it to NONE where nothing
    is compiled (enforce_eager, the CPU)."""
    mode = comp.cudagraph_mode
    if mode is None:
        comp.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif mode.has_full_cudagraphs():
        comp.cudagraph_mode = CUDAGraphMode.PIECEWISE
        logger.info(f"d3kernels: cudagraph_mode {mode.name} would capture the layer loop at one depth; using "
                    "PIECEWISE (CUDA graphs inside each decoder layer)")


class StockModelConfig(VerifyAndUpdateConfig):
    """On the stock architectures D3 extends: d3_* fields without a D3 architecture would be ignored."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        hf = vllm_config.model_config.hf_config
        given = sorted(k for k in config_keys(hf) if k in PARAMS)
        if given:
            arch = vllm_config.model_config.architecture
            raise ValueError(f"D3 parameters {given} were given for architecture {arch}, which ignores them: "
                             f"add \"architectures\": [\"D3{arch}\"] to hf_overrides")


def batch_steps(runner) -> tuple:
    """(steps, positions, chunk) of the tokens the runner is about to feed, int64 arrays [num_tokens] in
    its flattened batch order: step = position - prompt_length + 1 for a generated token, 0 for a prompt
    token (full depth); chunk = the number of tokens its request feeds in this step (> 1 for a prefill,
    or a recompute after preemption). Host data only (no device sync)."""
    ib = runner.input_batch
    n = ib.num_reqs
    qsl = runner.query_start_loc.np[: n + 1].astype(np.int64)
    counts = np.diff(qsl)
    req = np.repeat(np.arange(n), counts)
    pos = ib.num_computed_tokens_cpu[req].astype(np.int64) + (np.arange(int(qsl[-1])) - qsl[:-1][req])
    prompt = ib.num_prompt_tokens[req].astype(np.int64)
    return np.where(pos >= prompt, pos - prompt + 1, 0), pos, counts[req]


def install_runner_hook() -> None:
    """Wrap GPUModelRunner._model_forward (the CPU runner inherits it; vLLM documents it as the method to
    override for model execution): before a D3 model runs, hand it the batch's step indices."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    orig = GPUModelRunner._model_forward
    if getattr(orig, "_d3kernels", False):
        return

    def _model_forward(self, *args, **kwargs):
        d3 = getattr(self.get_model(), "d3", None)
        if d3 is not None:
            d3.set_batch(*batch_steps(self))
        return orig(self, *args, **kwargs)

    _model_forward._d3kernels = True
    GPUModelRunner._model_forward = _model_forward
