"""D3 (Position-Aware Depth Decay Decoding) inside transformers' generate(), run by d3kernels.

transformers loads this file for `model.generate(..., custom_generate="<this repo or folder>",
trust_remote_code=True)`. The loop itself is d3kernels.hf.generate; README.md lists the arguments.
"""
from d3kernels.hf import hub_generate


def generate(model, *args, **kwargs):
    """generate() with the D3 decoding loop: takes generate()'s arguments plus d3_alpha, d3_start,
    d3_tail, d3_order, d3_fill, d3_backend, d3_decay_start (or a dict d3={...})."""
    return hub_generate(model, *args, **kwargs)
