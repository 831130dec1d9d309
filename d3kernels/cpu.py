"""The native CPU backend ("cpu"): the decode ops of csrc/cpu/ (d3kernels._C_cpu) on CPU tensors, with
weights as the checkpoint stores them (docs/design.md section 3.8).

Ops take the reference's signatures (attn_block, mlp_block, write_kv, attn_block_paged, write_kv_paged,
lm_head, sample). Activations and the KV cache are float32, float16 or bfloat16; a weight is a tensor of
any of those dtypes or a packed weight of d3kernels.quant (PackedWeight, PackedRows, PackedStack: ggml's
q4_0, q4_1, q5_0, q5_1, q8_0, q4_K, q5_K, q6_K blocks, f16, bf16, f32, each row block in its own type),
read as stored, through a MatDesc (`weight_desc`). With a block type the activations are rounded to int16
per block of 32 before the integer dot products, so the outputs get
tolerance.PACKED_SLACK (docs/design.md section 6).

A step's launches can be recorded once (`record`) and run as one native call (`Program.run`): the CPU's
CUDA graph. The step core records one program per plan key, so a decode step costs one call from Python
and one parallel region, whatever the number of layers it keeps.

Instruction sets: the best this CPU has (avx512: AVX-512 F/BW/VL; avx2; scalar), or the one D3K_CPU_ISA
names (a lower one, for tests). Threads: torch.get_num_threads() at import (`set_num_threads`).
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Optional

import torch

from . import _ops, declare, quant
from . import reference as _ref

C = _ops.C_CPU
ERROR = _ops.C_CPU_ERROR
ISA_ENV = "D3K_CPU_ISA"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# activation dtype -> the C++ DType code (the float QType codes: d3k/cpu/ops.h numbers them alike)
_DTYPE_CODES = {dt: quant.CODES[q] for dt, q in quant.FLOAT_QTYPES.items()}
_STRUCTS = {"attn_block": "AttnArgs", "attn_block_paged": "AttnArgs", "mlp_block": "MlpArgs",
            "write_kv": "WriteKvArgs", "write_kv_paged": "WriteKvArgs", "lm_head": "LmHeadArgs"}
# Args struct -> (its launcher, the Program method that records it)
_LAUNCHERS = {"AttnArgs": ("attn_block", "add_attn"), "MlpArgs": ("mlp_block", "add_mlp"),
              "WriteKvArgs": ("write_kv", "add_write_kv"), "LmHeadArgs": ("lm_head", "add_lm_head")}
_WEIGHTS = ("wqkv", "wo", "w_gate_up", "w_down", "w_lm")
# what the paged KV writer does not read (it writes at slot_mapping)
_UNREAD = {"write_kv_paged": ("block_table", "max_pages")}


def _setup() -> Optional[str]:
    """Threads and instruction set at import; the problem with D3K_CPU_ISA, if any."""
    if C is None:
        return None
    C.set_num_threads(torch.get_num_threads())
    want = os.environ.get(ISA_ENV, "").strip()
    if want:
        try:
            C.set_isa(want)
        except RuntimeError as e:
            return f"{ISA_ENV}={want}: {e}"
    return None


ISA_ERROR = _setup()


def available() -> Optional[str]:
    """None if the backend can run, else why not."""
    if C is None:
        return ERROR
    return ISA_ERROR


def isa() -> str:
    """The instruction set in use ("avx512", "avx2" or "scalar")."""
    return C.isa()


def set_isa(name: str) -> None:
    """Use instruction set `name` (a lower one than the best, for tests); RuntimeError if the CPU lacks it."""
    C.set_isa(name)


@contextlib.contextmanager
def forced_isa(name: str):
    """Run the block with instruction set `name`, then go back."""
    old = C.isa()
    C.set_isa(name)
    try:
        yield
    finally:
        C.set_isa(old)


def set_num_threads(n: int) -> None:
    """Worker threads of every launch (default: torch.get_num_threads() at import)."""
    C.set_num_threads(int(n))


def _segments(m) -> list:
    """The row blocks (d3k/cpu/ops.h Seg: address, QType code, row stride in bytes, rows, perm_d) of a 2-D
    weight: a float tensor, a PackedWeight, or a PackedRows of them."""
    if isinstance(m, torch.Tensor):
        if m.dtype not in quant.FLOAT_QTYPES:
            raise TypeError(f"the cpu backend reads float32 / float16 / bfloat16 weights or PackedWeights, got {m.dtype}")
        es = m.element_size()
        return [(m.data_ptr(), quant.CODES[quant.FLOAT_QTYPES[m.dtype]], m.stride(0) * es, m.shape[0], 0)]
    parts = getattr(m, "parts", None)
    if parts is not None:
        return [seg for p in parts for seg in _segments(p)]
    rows, heads = m.data.shape[0], getattr(m, "heads", 0) or 0
    return [(m.data.data_ptr(), quant.CODES[m.qtype], m.data.stride(0), rows, rows // heads if heads else 0)]


def _layers(w, stacked: bool) -> list:
    """The 2-D matrices of a weight: its layers when stacked (a tensor or PackedWeight [L, ...], a PackedStack)."""
    if not stacked:
        return [w]
    layers = getattr(w, "layers", None)
    return list(layers) if layers is not None else [w[l] for l in range(w.shape[0])]


def weight_desc(w, stacked: bool = False) -> torch.Tensor:
    """The MatDesc array (int64 [n, 16]: n = 1, or L when stacked) the C++ ops read a weight through; the
    caller keeps it (and the weight) alive while anything may read it."""
    mats = _layers(w, stacked)
    desc = torch.zeros(len(mats), 1 + 5 * C.MAX_SEGS, dtype=torch.int64)
    for i, m in enumerate(mats):
        segs = _segments(m)
        if len(segs) > C.MAX_SEGS:
            raise ValueError(f"a weight of {len(segs)} row blocks; the cpu backend reads at most {C.MAX_SEGS}")
        desc[i, 0] = len(segs)
        for j, seg in enumerate(segs):
            desc[i, 1 + 5 * j: 6 + 5 * j] = torch.tensor(seg, dtype=torch.int64)
    return desc


class CpuKernels:
    """The cpu backend's ops (reference signatures) over a compiled module (d3kernels._C_cpu, or a test's
    variant of it). Each call fills the C++ Args struct of the op by field name from its declaration
    (d3kernels.declare) and launches it, or, inside `record(program)`, adds it to the program instead."""

    name = "cpu"
    LM_HEAD_SKIPS_IDLE_ROWS = True   # lm_head takes row_active (StepCore passes it)

    def __init__(self, module=None):
        self.C = module if module is not None else C
        self._program = None
        self._keep = None     # while recording: the weight descriptors the program reads

    def _args(self, name: str, args: tuple, keep: list):
        op = declare.OPS[name]
        struct = _STRUCTS[name]
        C = self.C
        a = getattr(C, struct)()
        skip = _UNREAD.get(name, ())
        stacked = struct == "WriteKvArgs"
        h = args[op.names.index(op.dispatch[0])]
        if not isinstance(h, torch.Tensor) or h.device.type != "cpu":
            raise RuntimeError(f"the cpu backend needs CPU tensors, got {getattr(h, 'device', type(h).__name__)}")
        if h.dtype not in _DTYPE_CODES:
            raise RuntimeError(f"the cpu backend takes float32, float16 or bfloat16 activations, got {h.dtype}")
        for arg, v in zip(op.names, args):
            field = op.fields.get(arg, arg)
            if arg in skip:
                continue
            if arg in _WEIGHTS:
                desc = weight_desc(v, stacked)
                keep.append(desc)
                setattr(a, field, desc.data_ptr())
            elif arg == "mode":
                a.mode = _ops.FILL_MODE_CODES[v]
            else:
                setattr(a, field, v.data_ptr() if isinstance(v, torch.Tensor) else 0 if v is None else v)
        for k, v in op.sizes_of(args).items():
            if k not in skip:
                setattr(a, k, v)
        if "page_size" in op.sizes:
            a.layout = C.Layout.paged
        if "rope_cos" in op.names:
            rope = args[op.names.index("rope_cos")]
            a.rope_len, a.rope_ld = rope.shape[0], rope.stride(0)
        a.dtype = C.DType(_DTYPE_CODES[h.dtype])
        a.eps = float(args[-1])
        return struct, a

    def _launch(self, name: str, args: tuple, **fields) -> None:
        """Launch op `name` (or record it): its reference arguments, plus struct fields beyond them."""
        keep = self._keep if self._program is not None else []
        struct, a = self._args(name, args, keep)
        for k, v in fields.items():
            setattr(a, k, v)
        launcher, add = _LAUNCHERS[struct]
        if self._program is not None:
            getattr(self._program, add)(a)
        else:
            getattr(self.C, launcher)(a)

    def record_step(self, launch) -> Step:
        """Record the launches launch(counts) makes (cpu ops; it counts them in `counts`) as a Step."""
        program, counts = self.C.Program(), Counter()
        with self.record(program) as keep:
            launch(counts)
        return Step(program, counts, keep)

    @contextlib.contextmanager
    def record(self, program):
        """Inside the block, op calls are added to `program` (a C.Program) instead of running; yields the list
        of weight descriptors the program reads, which must live as long as it."""
        self._program, self._keep = program, []
        try:
            yield self._keep
        finally:
            self._program, self._keep = None, None

    attn_block = _ops.launcher_method("attn_block")
    mlp_block = _ops.launcher_method("mlp_block")
    write_kv = _ops.launcher_method("write_kv")
    attn_block_paged = _ops.launcher_method("attn_block_paged")
    write_kv_paged = _ops.launcher_method("write_kv_paged", "rows with slot_mapping < 0 write nothing")

    def lm_head(self, logits, h, final_norm, w_lm, eps, row_active=None) -> None:
        """lm_head (reference signature), plus row_active uint8 [B] (optional): rows with 0 are not computed
        and their logits keep what they held, so a batch's idle slots cost nothing."""
        fields = {}
        if row_active is not None:
            B = h.shape[0]
            if (not isinstance(row_active, torch.Tensor) or row_active.dtype != torch.uint8
                    or tuple(row_active.shape) != (B,) or row_active.device.type != "cpu"
                    or not row_active.is_contiguous()):
                raise RuntimeError(f"lm_head: row_active must be a contiguous uint8 CPU tensor of shape ({B},), got "
                                   f"{getattr(row_active, 'dtype', type(row_active).__name__)} "
                                   f"{tuple(getattr(row_active, 'shape', ()))}")
            fields["row_active"] = row_active.data_ptr()
        self._launch("lm_head", (logits, h, final_norm, w_lm, eps), **fields)

    def sample(self, tokens, logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator=None) -> None:
        """sample (reference signature): greedy argmax natively; temperature > 0 uses the reference."""
        if temperature > 0.0:
            _ref.sample(tokens, logits, temperature, top_k, top_p, generator)
            return
        B, V = logits.shape
        self.C.argmax(tokens.data_ptr(), logits.data_ptr(), B, V, max(V, logits.stride(0)))


ops = CpuKernels()


class Step:
    """One recorded decode step (a C.Program) and the op calls it makes, per run."""

    def __init__(self, program, counts: Counter, keep: list):
        self.program, self.counts, self._keep = program, counts, keep

    def run(self) -> None:
        self.program.run()


# ------------------------------------------------------------------ the prefill's and embedding's fast paths
def linear(x: torch.Tensor, w: "quant.PackedWeight", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 [N, rows] = x [N, cols] @ W^T (+ bias), W a 2-D PackedWeight."""
    x = x.float().contiguous()
    N, K = x.shape
    R = w.shape[0]
    if K != w.cols:
        raise ValueError(f"linear: x has {K} columns, the weight {w.cols}")
    y = torch.empty(N, R, dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    C.linear(y.data_ptr(), x.data_ptr(), w.data.data_ptr(), quant.CODES[w.qtype], w.data.shape[-1],
             0 if b is None else b.data_ptr(), N, R, K)
    return y


def rows(w: "quant.PackedWeight", ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [N, cols] = the rows ids [N] of W, dequantized (ids outside the table give NaN rows)."""
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if out.dtype not in _DTYPE_CODES or not out.is_contiguous() or tuple(out.shape) != (ids.numel(), w.cols):
        raise ValueError(f"rows: out must be a contiguous float tensor [{ids.numel()}, {w.cols}]")
    C.embed(out.data_ptr(), _DTYPE_CODES[out.dtype], ids.data_ptr(), w.data.data_ptr(), quant.CODES[w.qtype],
            w.data.shape[-1], ids.numel(), w.shape[0], w.cols)
    return out


if C is not None:
    quant.NATIVE.update(linear=linear, rows=rows)
