"""Shared test helpers."""
from __future__ import annotations

import torch

from d3kernels.model import Model, random_model


def tiny_model(L: int = 4, d: int = 64, H: int = 4, H_kv: int = 2, D: int = 16, F: int = 96, V: int = 101,
               dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, qkv_bias: bool = False,
               tie_embeddings: bool = False) -> Model:
    """A random Llama-shaped d3kernels Model (no tokenizer): d3kernels.model.random_model with small
    defaults."""
    return random_model(L, d, H, H_kv, D, F, V, dtype, device, seed, qkv_bias, tie_embeddings)


# Interpreted Triton runs on CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU);
# compiled Triton on the GPU. Defined here, not in conftest.py: python_tests/ and bench/ both
# have a conftest module, so `from conftest import ...` is ambiguous in one pytest run.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def serve_staggered(server, prompts: list, lengths: list, arrive: dict, after_step=None, steps: int = 60) -> dict:
    """Run requests through a d3kernels.Server with staggered arrivals: arrive {step: [request k, ...]}
    queues request k (prompts[k], lengths[k] new tokens) before that step; queued requests are admitted
    while a slot is free. after_step(server) runs after every step. Returns {k: request id}."""
    slots = server.max_batch
    waiting, rid_of = [], {}
    for t in range(steps):
        waiting += arrive.get(t, [])
        while waiting and len(server.live) < slots:
            k = waiting.pop(0)
            rid_of[k] = server.add(prompts[k], max_new_tokens=lengths[k], ignore_eos=True)
        if not server.live and not waiting and t > max(arrive):
            break
        server.step()
        if after_step is not None:
            after_step(server)
    return rid_of


def cache_rows(g: torch.Generator, B: int, H_kv: int, S: int, D: int, positions: list, holes: list,
               dtype: torch.dtype, share=None) -> tuple:
    """One layer's contiguous cache for attention tests, on g's device: kv_valid [B, S] uint8 is 1 below
    row b's position except at the (row, position) holes; k, v [B, H_kv, S, D] are random in `dtype` and
    NaN wherever kv_valid = 0 (entries attention must never read). share (rows, n): rows[1:] take rows[0]'s
    K/V and kv_valid over positions < n (a shared prefix)."""
    kv_valid = torch.zeros(B, S, dtype=torch.uint8, device=g.device)
    for b, p in enumerate(positions):
        kv_valid[b, :p] = 1
    for b, p in holes:
        kv_valid[b, p] = 0
    k = torch.randn(B, H_kv, S, D, generator=g, device=g.device).to(dtype)
    v = torch.randn(B, H_kv, S, D, generator=g, device=g.device).to(dtype)
    if share is not None:
        rows, n = share
        for r in rows[1:]:
            k[r, :, :n], v[r, :, :n], kv_valid[r, :n] = k[rows[0], :, :n], v[rows[0], :, :n], kv_valid[rows[0], :n]
    invalid = (kv_valid == 0)[:, None, :, None].expand_as(k)
    k[invalid] = float("nan")
    v[invalid] = float("nan")
    return k, v, kv_valid


HF_TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=211,
               max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)


def tiny_hf_model(kind: str, layers: int = 5, seed=None, **config):
    """A random tiny transformers model, fp32, eval mode: "llama" (GQA 4/2), "qwen2" (GQA, tied embeddings,
    qkv biases drawn so they matter) or "mistral" (MQA, no sliding window). config: more config fields
    (e.g. rope_parameters). Weights are drawn larger than init's 0.02 so attention and the norms shape the
    output; the seed defaults to one per kind."""
    import transformers
    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[kind] if seed is None else seed)
    cfg = {**HF_TINY, "num_hidden_layers": layers, **config}
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, num_key_value_heads=2))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **{**cfg, "tie_word_embeddings": True}, num_key_value_heads=2))
        with torch.no_grad():   # HF initializes biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg, num_key_value_heads=1,
                                                                          sliding_window=None))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


# The pointer fields of the C++ launch structs (csrc/include/d3k/ops.h), for launcher tests that fill them
# with a fake device address.
LAUNCH_POINTERS = {
    "AttnBlockArgs": "out h attn_norm wqkv bqkv wo k_cache v_cache kv_valid pos rope_cos rope_sin row_active q_ws "
                     "o_ws part_ml part_acc counters",
    "MlpBlockArgs": "out h mlp_norm w_gate_up w_down row_active act_ws",
    "LmHeadArgs": "logits h final_norm w_lm",
    "WriteKvArgs": "k_cache v_cache kv_valid src_h norms wqkv bqkv pos rope_cos rope_sin flags",
}


def launch_args(C, cls: str, p: int, **fields):
    """C.<cls>() with every pointer field set to p, then `fields` set by name (unknown names raise)."""
    a = getattr(C, cls)()
    for name in LAUNCH_POINTERS[cls].split():
        setattr(a, name, p)
    for name, value in fields.items():
        setattr(a, name, value)
    return a
