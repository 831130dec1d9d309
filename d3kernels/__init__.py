"""d3kernels: fast dynamic-depth (D3) LLM decoding.

    import d3kernels
    print(d3kernels.generate("The capital of France is", alpha=0.998))

    model = d3kernels.load_model()                      # embedded SmolLM2-135M-Instruct
    dec = d3kernels.Decoder(model, d3kernels.D3Schedule(model.config.num_layers, alpha=0.995))
    out = dec.generate(model.tokenizer("Hello")["input_ids"], max_new_tokens=32)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .schedule import D3Schedule
from .model import Model, ModelConfig, Weights, load_model, embedded_model_path
from .decoder import Decoder, Generation
from .generate import Chat, generate, encode_prompt
from .serving import Server
from .cache import PoolFull
from .calibrate import calibrate_skip_order
from .eval import evaluate
from . import backends as _backends, selftest as _selftest

_backends.FIRST_USE_CHECK = _selftest.first_use     # auto verifies a GPU backend once, at first use

__all__ = ["D3Schedule", "Model", "ModelConfig", "Weights", "load_model", "embedded_model_path", "Decoder",
           "Generation", "Chat", "Server", "PoolFull", "generate", "encode_prompt", "calibrate_skip_order", "evaluate", "__version__"]
