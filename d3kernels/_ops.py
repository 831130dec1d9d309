"""The only module that imports the compiled extensions ``d3kernels._C`` (the CUDA
kernels), ``d3kernels._C_emu`` (the same kernels on the SIMT emulation layer) and
``d3kernels._C_cpu`` (the native CPU backend; its ops live in d3kernels.cpu).

``C`` / ``C_EMU`` / ``C_CPU`` are the extension modules, or None when unavailable;
``C_ERROR`` / ``C_EMU_ERROR`` / ``C_CPU_ERROR`` then say why. Importing this module
never needs _C or a GPU.

It also provides:
- ``CUDA_OPS_AVAILABLE``: True when _C exports the fused decode kernels.
- ``arch_problem(device)``: None when _C holds code for the device's compute
  capability, else a message naming D3K_CUDA_ARCHS.
- ``cuda_ops``: the CUDA backend, a ``CudaKernels`` over _C (attn_block,
  mlp_block, write_kv, attn_block_paged, write_kv_paged, lm_head, sample with
  the reference signatures) on CUDA
  tensors; ``cuda_emu_ops``: the "cuda-emu" backend, the same over _C_emu on
  CPU tensors. See ``CudaKernels`` for scratch handling.
- ``torch.ops.d3k.*``, the low-level API (README, "Low-level API"): attn_block,
  mlp_block, write_kv, attn_block_paged, write_kv_paged (a paged KV cache),
  lm_head, sample_greedy and sample, torch.library ops that
  mutate their annotated arguments and return nothing. CPU kernel: the
  argument checks, then the reference; CUDA kernel: the CUDA kernels (sample
  with temperature > 0: the reference's pure-torch code, no host sync); fake
  kernel: the argument checks only. So they pass torch.library.opcheck and work
  under torch.compile(fullgraph=True) and CUDA graph capture.

Imports: torch, d3kernels.checks, d3kernels.reference and d3kernels.guarded;
nothing above it (backends, ops, the driver, the CLI).
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch

from . import checks as _checks
from . import declare, workspace
from . import reference as _ref


def _import_extension(name: str, load, not_built: str) -> tuple:
    """(module, None), or (None, why it is unavailable) for the compiled extension `name` that load() imports."""
    try:
        return load(), None
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None, not_built
    except ImportError as e:  # built but unloadable: wrong Python, missing symbol, ...
        return None, f"{name} failed to import (rebuild it on this machine): {e}"


C, C_ERROR = _import_extension(
    "d3kernels._C", lambda: importlib.import_module("d3kernels._C"),
    "d3kernels._C is not built: no nvcc was found at install time, or D3K_SKIP_CUDA_BUILD=1 was set (install "
    "the CUDA 13 toolkit, set CUDA_HOME=/usr/local/cuda and reinstall: pip install --no-build-isolation -e .)")
C_EMU, C_EMU_ERROR = _import_extension(
    "d3kernels._C_emu", lambda: importlib.import_module("d3kernels._C_emu"),
    "d3kernels._C_emu (the emulated CUDA build) is not built: it was skipped at install time "
    "(D3K_SKIP_EMU_BUILD=1, or no C++ compiler); reinstall: pip install --no-build-isolation -e .")
C_CPU, C_CPU_ERROR = _import_extension(
    "d3kernels._C_cpu", lambda: importlib.import_module("d3kernels._C_cpu"),
    "d3kernels._C_cpu (the native CPU backend) is not built: it was skipped at install time "
    "(D3K_SKIP_CPU_BUILD=1, or no C++ compiler); reinstall: pip install -e .")


def build_info() -> dict | None:
    """What _C was built with ({version, cuda_archs, nvcc_version, compiled_with}), or None."""
    return None if C is None else C.build_info()


def runtime_info() -> dict | str:
    """CUDA runtime/driver/devices as a dict, or a string saying why CUDA is unusable."""
    if C is None:
        return C_ERROR
    try:
        return C.runtime_info()
    except RuntimeError as e:
        return str(e)


# --------------------------------------------------------------------------- availability
_KERNELS = ("attn_block", "attn_workspace", "mlp_block", "write_kv", "lm_head", "argmax", "device_facts",
            "AttnBlockArgs", "MlpBlockArgs", "LmHeadArgs", "WriteKvArgs", "CacheLayout")
CUDA_OPS_AVAILABLE: bool = C is not None and all(hasattr(C, n) for n in _KERNELS)

# What the kernels take (csrc/include/d3k/limits.h), from the build itself: _C, or the emulated build of the
# same sources. None when neither is built (no CUDA backend can run then).
_BUILT = C or C_EMU
KERNEL_LIMITS: Optional[dict] = _BUILT.build_info().get("limits") if _BUILT is not None else None
CUDA_DTYPES = {getattr(torch, name): code for code, name in enumerate((KERNEL_LIMITS or {}).get("dtypes", ()))}
CUDA_HEAD_DIMS = tuple((KERNEL_LIMITS or {}).get("head_dims", ()))
FILL_MODE_CODES = {"mask": 0, "project": 1, "copy": 2}


def kernel_limits_problem(dtype: torch.dtype, head_dim: Optional[int], page_size: Optional[int]) -> Optional[str]:
    """What the CUDA kernels (native or emulated) cannot take, from the build's limits; None if they can."""
    if KERNEL_LIMITS is None:
        return C_ERROR
    if dtype not in CUDA_DTYPES:
        return f"dtype {dtype} is not supported by the CUDA kernels ({', '.join(KERNEL_LIMITS['dtypes'])})"
    if head_dim is not None and head_dim not in CUDA_HEAD_DIMS:
        return f"head_dim {head_dim} is not supported by the CUDA kernels {CUDA_HEAD_DIMS}"
    m = KERNEL_LIMITS["page_size_multiple"]
    if page_size is not None and page_size % m:
        return f"page_size {page_size} is not supported by the CUDA attention kernel (a multiple of {m})"
    return None


@functools.lru_cache(maxsize=None)
def _arch_problem_for(index: int) -> Optional[str]:
    archs = list(build_info()["cuda_archs"])
    major, minor = torch.cuda.get_device_capability(index)
    cc = 10 * major + minor
    if cc in archs:
        return None
    name = torch.cuda.get_device_name(index)
    built = ",".join(str(a) for a in archs) or "none"
    return (f"d3kernels._C was built for compute capabilities {built} (D3K_CUDA_ARCHS={built}), but "
            f"cuda:{index} ({name}) is {major}.{minor}; rebuild with D3K_CUDA_ARCHS={cc} "
            "pip install --no-build-isolation -e .")


def arch_problem(device) -> Optional[str]:
    """None if _C holds kernels for this device's compute capability, else why not (names D3K_CUDA_ARCHS)."""
    if C is None:
        return C_ERROR
    device = torch.device(device)
    if device.type != "cuda":
        return f"tensors are on {device.type}; the CUDA backend needs CUDA tensors"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _arch_problem_for(index)


# --------------------------------------------------------------------------- the CUDA kernels, as ops
def _dtype_code(dtype: torch.dtype) -> int:
    code = CUDA_DTYPES.get(dtype)
    if code is None:
        raise RuntimeError(f"the CUDA kernels support float16 and bfloat16, got {dtype}")
    return code


# op -> (C++ launcher, its Args struct): the paged ops share the contiguous ones' launchers (layout field)
_LAUNCHERS = {"attn_block": ("attn_block", "AttnBlockArgs"), "attn_block_paged": ("attn_block", "AttnBlockArgs"),
              "mlp_block": ("mlp_block", "MlpBlockArgs"), "lm_head": ("lm_head", "LmHeadArgs"),
              "write_kv": ("write_kv", "WriteKvArgs"), "write_kv_paged": ("write_kv", "WriteKvArgs")}


def launcher_method(name: str, note: str = ""):
    """A kernels class's method <name>: the reference op's signature, handed to the class's _launch(name, args)
    (CudaKernels here, d3kernels.cpu.CpuKernels)."""
    def method(self, *args) -> None:
        self._launch(name, args)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"{name} (reference signature){'; ' + note if note else ''}."
    return method


def _stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


class CudaKernels:
    """The kernels of one compiled module with the reference ops' signatures (attn_block, mlp_block,
    write_kv, attn_block_paged, write_kv_paged, lm_head, sample). Each call checks its arguments (checks.check_*), passes raw pointers, sizes
    and a stream to the module, and raises RuntimeError with the launcher's message on failure.

    Two instances exist: `cuda_ops` runs d3kernels._C on CUDA tensors; `cuda_emu_ops` runs
    d3kernels._C_emu (the same csrc/ code on the SIMT emulation layer) on CPU tensors.

    Scratch (q, split-K partials, the attention output, the MLP activation, split counters):
    - cuda: from the active workspace (d3kernels.workspace): made on the first call per (device, shape) and
      reused, so later calls and CUDA graph capture allocate nothing. Each decoding state (StepCore) has its
      own workspace, so two decoders on two streams share nothing; direct calls outside one share the
      default workspace.
    - cuda-emu: allocated for every call in page-guarded buffers (d3kernels.guarded) and poisoned
      (NaN, 0x7b bytes), so a kernel that reads scratch it did not write, or runs past it, is caught.
    """

    def __init__(self, module, device_type: str, name: str, error: Optional[str]):
        self.C = module
        self.device_type = device_type
        self.name = name
        self.error = error
        self.available = module is not None and all(hasattr(module, n) for n in _KERNELS)

    def __repr__(self) -> str:
        return f"CudaKernels({self.name!r} on {self.device_type} tensors, available={self.available})"

    # ------------------------------------------------------------------ plumbing
    def _device(self, t: torch.Tensor) -> int:
        """The device index for the launch; raises if `t` is on the wrong kind of device."""
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            raise RuntimeError(f"the {self.name} backend needs {self.device_type.upper()} tensors, got "
                               f"{getattr(t, 'device', type(t).__name__)}")
        if not self.available:
            raise RuntimeError(self.error or f"the {self.name} module was built without the CUDA kernels; rebuild it")
        if self.device_type != "cuda":
            return 0
        return t.device.index if t.device.index is not None else torch.cuda.current_device()

    def _stream(self, index: int) -> int:
        return _stream(index) if self.device_type == "cuda" else 0

    def _call(self, fn, *args) -> None:
        try:
            fn(*args)
        except RuntimeError as e:
            if self.device_type == "cuda":
                raise
            from . import guarded
            raise RuntimeError(guarded.describe(str(e))) from None

    def _buffer(self, key: tuple, index: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Scratch of n elements from the active workspace (int32 counters are zeroed once, when made)."""
        if self.device_type == "cpu":
            from . import guarded
            # 16-byte aligned, as the launchers require (a GPU allocation is 256-byte aligned)
            return guarded.poison_(guarded.empty((max(1, n),), dtype, align=16))
        return workspace.active().tensor(f"{self.name}:{key}", (max(1, n),), torch.device("cuda", index), dtype,
                                         zero=dtype == torch.int32)

    def _attn_scratch(self, index: int, B: int, H: int, H_kv: int, D: int, S: int) -> dict:
        key = ("attn", index, B, H, H_kv, D, S)
        plan = workspace.active().get((self.name,) + key + ("plan",),
                                      lambda: self.C.attn_workspace(B, H, H_kv, D, S, index))
        f32 = torch.float32
        return {"plan": plan, "q": self._buffer(key + ("q",), index, plan["q_elems"], f32),
                "o": self._buffer(key + ("o",), index, plan["o_elems"], f32),
                "ml": self._buffer(key + ("ml",), index, plan["ml_elems"], f32),
                "acc": self._buffer(key + ("acc",), index, plan["acc_elems"], f32),
                "counters": self._buffer(key + ("counters",), index, plan["counters"], torch.int32)}

    # ------------------------------------------------------------------ ops
    def _launch(self, name: str, args: tuple) -> None:
        """Fill the C++ Args struct of op `name` by field name (tensors as pointers, None as 0, the fill mode as
        its code, the sizes read from the shapes, the layout, scratch) and launch. The metadata was checked
        at the boundary (ops.*, torch.ops.d3k, the step core's construction); the launcher checks what C++
        must (sizes, null pointers, alignment, limits). The kernels cannot raise without a host sync: an
        active row with a position outside its cache gets NaN (attention) or writes nothing; see the
        reference for the data checks."""
        op = declare.OPS[name]
        t = args[op.names.index(op.dispatch[0])]
        idx = self._device(t)
        code = _dtype_code(t.dtype)
        sizes = op.sizes_of(args)
        problem = kernel_limits_problem(t.dtype, sizes.get("D"), sizes["page_size"] if name == "attn_block_paged"
                                        else None)
        if problem:
            raise RuntimeError(problem)
        launcher, struct = _LAUNCHERS[name]
        a = getattr(self.C, struct)()
        for arg, v in zip(op.names, args):
            v = v.data_ptr() if isinstance(v, torch.Tensor) else 0 if v is None else v
            setattr(a, op.fields.get(arg, arg), FILL_MODE_CODES[v] if arg == "mode" else v)
        for k, v in sizes.items():
            setattr(a, k, v)
        if "page_size" in sizes:
            a.layout, a.S = self.C.CacheLayout.paged, sizes["max_pages"] * sizes["page_size"]
        if "rope_cos" in op.names:
            rope = args[op.names.index("rope_cos")]
            a.rope_len, a.rope_ld = rope.shape[0], rope.stride(0)
        a.dtype, a.device, a.stream, a.eps = code, idx, self._stream(idx), float(args[-1])
        scratch = {}            # held until the launch returns (a CPU guard buffer is freed with its tensor)
        if launcher == "attn_block":
            scratch = self._attn_scratch(idx, a.B, a.H, a.Hkv, a.D, a.S)
            a.q_ws, a.o_ws, a.part_ml, a.part_acc, a.counters = (scratch[k].data_ptr() for k in ("q", "o", "ml",
                                                                                                   "acc", "counters"))
            a.num_splits = scratch["plan"]["num_splits"]
            if name == "attn_block_paged":     # k1's effective row status, read by k2 and k3
                scratch["rows"] = self._buffer(("attn", idx, a.B, a.H, a.Hkv, a.D, a.S, "rows"), idx,
                                               scratch["plan"]["rows_elems"], torch.int32)
                a.rows_ws = scratch["rows"].data_ptr()
        elif launcher == "mlp_block":
            scratch["act"] = self._buffer(("mlp", idx, a.B, a.F), idx, a.B * a.F, torch.float32)
            a.act_ws = scratch["act"].data_ptr()
        self._call(getattr(self.C, launcher), a)

    attn_block = launcher_method("attn_block")
    mlp_block = launcher_method("mlp_block")
    write_kv = launcher_method("write_kv")
    attn_block_paged = launcher_method("attn_block_paged", "page_size a multiple of the build's "
                                                            "page_size_multiple")
    write_kv_paged = launcher_method("write_kv_paged", "rows with slot_mapping < 0 write nothing")
    lm_head = launcher_method("lm_head")

    def sample(self, tokens, logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator=None) -> None:
        """sample (reference signature): greedy argmax in a kernel; temperature > 0 uses the reference
        (pure torch, no host sync)."""
        if temperature > 0.0:
            _ref.sample(tokens, logits, temperature, top_k, top_p, generator)
            return
        idx = self._device(logits)
        B, V = _checks.check_sample(tokens, logits)
        self._call(self.C.argmax, tokens.data_ptr(), logits.data_ptr(), B, V, max(V, logits.stride(0)), idx,
                   self._stream(idx))


cuda_ops = CudaKernels(C, "cuda", "cuda", C_ERROR)
cuda_emu_ops = CudaKernels(C_EMU, "cpu", "cuda-emu", C_EMU_ERROR)


def clear_scratch() -> None:
    """Drop the default workspace's scratch buffers (re-allocated on the next call outside a decoding state)."""
    workspace.DEFAULT.clear()


# --------------------------------------------------------------------------- torch.library
# Every argument is a tensor or a scalar; mutated tensors are annotated (a!) and nothing is returned, so
# torch.compile keeps the ops in place (no copy of a KV cache) and a CUDA graph captures them as they are.
SCHEMAS = {name: op.schema for name, op in declare.OPS.items()}


# Argument checks: every kernel (CPU and fake) checks first, so a bad call fails with the same message
# eagerly and while torch.compile traces. The CUDA kernels check inside CudaKernels.
def _check(name: str):
    op = declare.OPS[name]

    def check(*args) -> None:
        op.check_args(args)
    return check


_CHECKS = {name: _check(name) for name in declare.OPS}


def _sample_greedy(tokens, logits) -> None:
    _ref.sample(tokens, logits)


def _sample(tokens, logits, noise, temperature, top_k, top_p) -> None:
    _ref.sample_from_noise(tokens, logits, noise, temperature, top_k, top_p)


def _cuda_sample_greedy(tokens, logits) -> None:
    cuda_ops.sample(tokens, logits)


_REF_IMPLS = {"attn_block": _ref.attn_block, "mlp_block": _ref.mlp_block, "write_kv": _ref.write_kv,
              "attn_block_paged": _ref.attn_block_paged, "write_kv_paged": _ref.write_kv_paged,
              "lm_head": _ref.lm_head, "sample_greedy": _sample_greedy, "sample": _sample}
_CUDA_IMPLS = {"attn_block": cuda_ops.attn_block, "mlp_block": cuda_ops.mlp_block, "write_kv": cuda_ops.write_kv,
               "attn_block_paged": cuda_ops.attn_block_paged, "write_kv_paged": cuda_ops.write_kv_paged,
               "lm_head": cuda_ops.lm_head, "sample_greedy": _cuda_sample_greedy}
_CUDA_TORCH = ("sample",)       # pure torch on CUDA tensors too (no CUDA kernel; no host sync)


def _checked(name: str, impl):
    check = _CHECKS[name]

    def run(*args) -> None:
        check(*args)
        impl(*args)
    run.__name__ = run.__qualname__ = f"d3k_{name}"
    return run


def _unavailable(name: str):
    def impl(*args, **kwargs):
        raise RuntimeError(f"torch.ops.d3k.{name} on CUDA: {C_ERROR or 'd3kernels._C has no CUDA kernels'}")
    return impl


def _fake(name: str):
    """Fake (meta) kernel: check the arguments' metadata; the ops only mutate their annotated arguments and
    return nothing, so there is nothing to compute."""
    check = _CHECKS[name]

    def fake(*args) -> None:
        check(*args)
        return None
    fake.__name__ = fake.__qualname__ = f"d3k_{name}_fake"
    return fake


def _register() -> Optional[torch.library.Library]:
    if all(hasattr(torch.ops.d3k, name) for name in SCHEMAS):   # already registered (module reloaded)
        return None
    lib = torch.library.Library("d3k", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _checked(name, _REF_IMPLS[name]), "CPU")
        if name in _CUDA_TORCH:
            cuda = _checked(name, _REF_IMPLS[name])
        else:
            cuda = _checked(name, _CUDA_IMPLS[name]) if CUDA_OPS_AVAILABLE else _unavailable(name)
        lib.impl(name, cuda, "CUDA")
        torch.library.register_fake(f"d3k::{name}", _fake(name), lib=lib)
    return lib


_LIB = _register()
