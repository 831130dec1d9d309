"""The only module that imports the compiled extensions ``d3kernels._C`` (the CUDA
kernels) and ``d3kernels._C_emu`` (the same kernels on the SIMT emulation layer).

``C`` / ``C_EMU`` are the extension modules, or None when unavailable;
``C_ERROR`` / ``C_EMU_ERROR`` then say why. Importing this module never needs
_C or a GPU.

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
_KERNELS = ("attn_block", "attn_workspace", "mlp_block", "write_kv", "attn_block_paged", "write_kv_paged", "lm_head",
            "argmax", "device_facts")
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


def _head_dim(D: int) -> None:
    if D not in CUDA_HEAD_DIMS:
        raise RuntimeError(f"head_dim {D} is not supported by the CUDA kernels {CUDA_HEAD_DIMS}")


def _stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


class CudaKernels:
    """The kernels of one compiled module with the reference ops' signatures (attn_block, mlp_block,
    write_kv, attn_block_paged, write_kv_paged, lm_head, sample). Each call checks its arguments (checks.check_*), passes raw pointers, sizes
    and a stream to the module, and raises RuntimeError with the launcher's message on failure.

    Two instances exist: `cuda_ops` runs d3kernels._C on CUDA tensors; `cuda_emu_ops` runs
    d3kernels._C_emu (the same csrc/ code on the SIMT emulation layer) on CPU tensors.

    Scratch (q, split-K partials, the attention output, the MLP activation, split counters):
    - cuda: allocated on the first call per (device, shape) and reused, so later calls and CUDA graph
      capture allocate nothing. Calls on one device share it: do not run d3k ops on two streams of one
      device at the same time.
    - cuda-emu: allocated for every call in page-guarded buffers (d3kernels.guarded) and poisoned
      (NaN, 0x7b bytes), so a kernel that reads scratch it did not write, or runs past it, is caught.
    """

    def __init__(self, module, device_type: str, name: str, error: Optional[str]):
        self.C = module
        self.device_type = device_type
        self.name = name
        self.error = error
        self.available = module is not None and all(hasattr(module, n) for n in _KERNELS)
        self._scratch: dict = {}

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
        if self.device_type == "cpu":
            from . import guarded
            # 16-byte aligned, as the launchers require (a GPU allocation is 256-byte aligned)
            return guarded.poison_(guarded.empty((max(1, n),), dtype, align=16))
        t = self._scratch.get(key)
        if t is None:
            dev = torch.device("cuda", index)
            t = (torch.zeros if dtype == torch.int32 else torch.empty)(max(1, n), device=dev, dtype=dtype)
            self._scratch[key] = t
        return t

    def clear_scratch(self) -> None:
        """Drop every cached scratch buffer (they are re-allocated on the next call)."""
        self._scratch.clear()

    def _attn_scratch(self, index: int, B: int, H: int, H_kv: int, D: int, S: int) -> dict:
        key = ("attn", index, B, H, H_kv, D, S)
        plan = self._scratch.get(key + ("plan",))
        if plan is None:
            plan = self.C.attn_workspace(B, H, H_kv, D, S, index)
            self._scratch[key + ("plan",)] = plan
        f32 = torch.float32
        return {"plan": plan, "q": self._buffer(key + ("q",), index, plan["q_elems"], f32),
                "o": self._buffer(key + ("o",), index, plan["o_elems"], f32),
                "ml": self._buffer(key + ("ml",), index, plan["ml_elems"], f32),
                "acc": self._buffer(key + ("acc",), index, plan["acc_elems"], f32),
                "counters": self._buffer(key + ("counters",), index, plan["counters"], torch.int32)}

    # ------------------------------------------------------------------ ops
    def attn_block(self, out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin,
                   row_active, eps) -> None:
        """attn_block (reference signature). An active row whose pos is outside [0, S) gets NaN in out and
        writes nothing: the kernels cannot raise without a host sync."""
        idx = self._device(h)
        code = _dtype_code(h.dtype)
        if k_cache.dim() == 4:
            _head_dim(k_cache.shape[3])
        B, d, H, H_kv, D, S = _checks.check_attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache,
                                                       kv_valid, pos, rope_cos, rope_sin, row_active)
        T, rope_ld = rope_cos.shape[0], rope_cos.stride(0)
        ws = self._attn_scratch(idx, B, H, H_kv, D, S)
        self._call(self.C.attn_block, out.data_ptr(), h.data_ptr(), attn_norm.data_ptr(), wqkv.data_ptr(),
                   0 if bqkv is None else bqkv.data_ptr(), wo.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   kv_valid.data_ptr(), pos.data_ptr(), rope_cos.data_ptr(), rope_sin.data_ptr(),
                   row_active.data_ptr(), ws["q"].data_ptr(), ws["o"].data_ptr(), ws["ml"].data_ptr(),
                   ws["acc"].data_ptr(), ws["counters"].data_ptr(), B, d, H, H_kv, D, S, T, rope_ld,
                   ws["plan"]["num_splits"], float(eps), code, idx, self._stream(idx))

    def mlp_block(self, out, h, mlp_norm, w_gate_up, w_down, row_active, eps) -> None:
        """mlp_block (reference signature)."""
        idx = self._device(h)
        code = _dtype_code(h.dtype)
        B, d, F = _checks.check_mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active)
        act = self._buffer(("mlp", idx, B, F), idx, B * F, torch.float32)
        self._call(self.C.mlp_block, out.data_ptr(), h.data_ptr(), mlp_norm.data_ptr(), w_gate_up.data_ptr(),
                   w_down.data_ptr(), row_active.data_ptr(), act.data_ptr(), B, d, F, float(eps), code, idx,
                   self._stream(idx))

    def write_kv(self, k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags, mode,
                 eps) -> None:
        """write_kv (reference signature). Flagged rows whose pos is outside [0, S) are left untouched."""
        idx = self._device(k_cache)
        code = _dtype_code(k_cache.dtype)
        if k_cache.dim() == 5:
            _head_dim(k_cache.shape[4])
        L, B, d, H, H_kv, D, S = _checks.check_write_kv(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos,
                                                        rope_cos, rope_sin, flags, mode)
        T, rope_ld = rope_cos.shape[0], rope_cos.stride(0)
        self._call(self.C.write_kv, k_cache.data_ptr(), v_cache.data_ptr(), kv_valid.data_ptr(), src_h.data_ptr(),
                   norms.data_ptr(), wqkv.data_ptr(), 0 if bqkv is None else bqkv.data_ptr(), pos.data_ptr(),
                   rope_cos.data_ptr(), rope_sin.data_ptr(), flags.data_ptr(), FILL_MODE_CODES[mode], L, B, d, H, H_kv,
                   D, S, T, rope_ld, float(eps), code, idx, self._stream(idx))

    def attn_block_paged(self, out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table,
                         pos, slot_mapping, rope_cos, rope_sin, row_active, eps) -> None:
        """attn_block_paged (reference signature). page_size must be a multiple of 16. The kernels cannot raise
        without a host sync, so: a running row (row_active = 1, slot_mapping >= 0) whose pos is outside
        [0, min(max_pages * page_size, rope rows)) or whose slot is past the pool gets NaN in out and writes
        nothing; a block_table entry outside [0, num_pages) among the pages a running row reads makes that
        row's out NaN (its K/V are still written); K/V are written at slot_mapping and read through
        block_table, whether or not the two agree."""
        idx = self._device(h)
        code = _dtype_code(h.dtype)
        if k_pages.dim() == 4:
            _head_dim(k_pages.shape[3])
        B, d, H, H_kv, D, P, ps, M = _checks.check_attn_block_paged(
            out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table, pos, slot_mapping,
            rope_cos, rope_sin, row_active)
        problem = kernel_limits_problem(h.dtype, D, ps)
        if problem:
            raise RuntimeError(problem)
        T, rope_ld = rope_cos.shape[0], rope_cos.stride(0)
        ws = self._attn_scratch(idx, B, H, H_kv, D, M * ps)   # the split plan of a cache of max_pages pages
        rows = self._buffer(("attn", idx, B, H, H_kv, D, M * ps, "rows"), idx, ws["plan"]["rows_elems"],
                            torch.int32)                      # k1's effective row status, read by k2 and k3
        self._call(self.C.attn_block_paged, out.data_ptr(), h.data_ptr(), attn_norm.data_ptr(), wqkv.data_ptr(),
                   0 if bqkv is None else bqkv.data_ptr(), wo.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(),
                   kv_valid_pages.data_ptr(), block_table.data_ptr(), pos.data_ptr(), slot_mapping.data_ptr(),
                   rope_cos.data_ptr(), rope_sin.data_ptr(), row_active.data_ptr(), ws["q"].data_ptr(),
                   ws["o"].data_ptr(), ws["ml"].data_ptr(), ws["acc"].data_ptr(), ws["counters"].data_ptr(),
                   rows.data_ptr(), B, d, H, H_kv, D, P, ps, M, T, rope_ld, ws["plan"]["num_splits"], float(eps), code, idx,
                   self._stream(idx))

    def write_kv_paged(self, k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos,
                       slot_mapping, rope_cos, rope_sin, flags, mode, eps) -> None:
        """write_kv_paged (reference signature). Rows with slot_mapping < 0 write nothing; a flagged row whose
        slot is past the pool or whose pos is outside [0, min(max_pages * page_size, rope rows)) is left
        untouched (the kernels cannot raise without a host sync). block_table is not read."""
        idx = self._device(k_pages)
        code = _dtype_code(k_pages.dtype)
        if k_pages.dim() == 5:
            _head_dim(k_pages.shape[4])
        L, B, d, H, H_kv, D, P, ps, M = _checks.check_write_kv_paged(
            k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos, slot_mapping, rope_cos,
            rope_sin, flags, mode)
        T, rope_ld = rope_cos.shape[0], rope_cos.stride(0)
        self._call(self.C.write_kv_paged, k_pages.data_ptr(), v_pages.data_ptr(), kv_valid_pages.data_ptr(),
                   src_h.data_ptr(), norms.data_ptr(), wqkv.data_ptr(), 0 if bqkv is None else bqkv.data_ptr(),
                   pos.data_ptr(), slot_mapping.data_ptr(), rope_cos.data_ptr(), rope_sin.data_ptr(),
                   flags.data_ptr(), FILL_MODE_CODES[mode], L, B, d, H, H_kv, D, P, ps, M, T, rope_ld, float(eps),
                   code, idx, self._stream(idx))

    def lm_head(self, logits, h, final_norm, w_lm, eps) -> None:
        """lm_head (reference signature)."""
        idx = self._device(h)
        code = _dtype_code(h.dtype)
        B, d, V = _checks.check_lm_head(logits, h, final_norm, w_lm)
        self._call(self.C.lm_head, logits.data_ptr(), h.data_ptr(), final_norm.data_ptr(), w_lm.data_ptr(), B, d, V,
                   float(eps), code, idx, self._stream(idx))

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
    """Drop every cached scratch buffer of the CUDA backend (they are re-allocated on the next call)."""
    cuda_ops.clear_scratch()


# --------------------------------------------------------------------------- torch.library
# Every argument is a tensor or a scalar; mutated tensors are annotated (a!) and nothing is returned, so
# torch.compile keeps the ops in place (no copy of a KV cache) and a CUDA graph captures them as they are.
SCHEMAS = {
    "attn_block": "attn_block(Tensor(a!) out, Tensor h, Tensor attn_norm, Tensor wqkv, Tensor? bqkv, Tensor wo, "
                  "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor(d!) kv_valid, Tensor pos, Tensor rope_cos, "
                  "Tensor rope_sin, Tensor row_active, float eps) -> ()",
    "mlp_block": "mlp_block(Tensor(a!) out, Tensor h, Tensor mlp_norm, Tensor w_gate_up, Tensor w_down, "
                 "Tensor row_active, float eps) -> ()",
    "write_kv": "write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) kv_valid, Tensor src_h, "
                "Tensor norms, Tensor wqkv, Tensor? bqkv, Tensor pos, Tensor rope_cos, Tensor rope_sin, "
                "Tensor flags, str fill_mode, float eps) -> ()",
    # Paged KV cache (one layer's pages for attn_block_paged, the [L, ...] stack for write_kv_paged);
    # slot_mapping is int64, -1 = write (and run) nothing.
    "attn_block_paged": "attn_block_paged(Tensor(a!) out, Tensor h, Tensor attn_norm, Tensor wqkv, Tensor? bqkv, "
                        "Tensor wo, Tensor(b!) k_pages, Tensor(c!) v_pages, Tensor(d!) kv_valid_pages, "
                        "Tensor block_table, Tensor pos, Tensor slot_mapping, Tensor rope_cos, Tensor rope_sin, "
                        "Tensor row_active, float eps) -> ()",
    "write_kv_paged": "write_kv_paged(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor(c!) kv_valid_pages, "
                      "Tensor src_h, Tensor norms, Tensor wqkv, Tensor? bqkv, Tensor block_table, Tensor pos, "
                      "Tensor slot_mapping, Tensor rope_cos, Tensor rope_sin, Tensor flags, str fill_mode, "
                      "float eps) -> ()",
    "lm_head": "lm_head(Tensor(a!) logits, Tensor h, Tensor final_norm, Tensor w_lm, float eps) -> ()",
    # Sampling takes no generator (a schema cannot hold one): sample_greedy is the argmax, and sample takes
    # its randomness as a tensor, noise [B, V] float32 of Exp(1) draws, filled by the caller
    # (noise.exponential_(generator=g)); the same noise gives the same tokens on every backend.
    "sample_greedy": "sample_greedy(Tensor(a!) tokens, Tensor logits) -> ()",
    "sample": "sample(Tensor(a!) tokens, Tensor logits, Tensor noise, float temperature, int top_k, "
              "float top_p) -> ()",
}


# Argument checks: every kernel (CPU and fake) checks first, so a bad call fails with the same message
# eagerly and while torch.compile traces. The CUDA kernels check inside CudaKernels.
def _check_attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos, rope_sin,
                      row_active, eps) -> None:
    _checks.check_attn_block(out, h, attn_norm, wqkv, bqkv, wo, k_cache, v_cache, kv_valid, pos, rope_cos,
                             rope_sin, row_active)


def _check_mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active, eps) -> None:
    _checks.check_mlp_block(out, h, mlp_norm, w_gate_up, w_down, row_active)


# write_kv's string argument is "fill_mode" in the schema: an op argument named "mode" collides with
# torch's functionalization internals (aot_dispatch: "got multiple values for argument 'mode'").
def _check_write_kv(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags,
                    fill_mode, eps) -> None:
    _checks.check_write_kv(k_cache, v_cache, kv_valid, src_h, norms, wqkv, bqkv, pos, rope_cos, rope_sin, flags,
                           fill_mode)


def _check_attn_block_paged(out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table, pos,
                            slot_mapping, rope_cos, rope_sin, row_active, eps) -> None:
    _checks.check_attn_block_paged(out, h, attn_norm, wqkv, bqkv, wo, k_pages, v_pages, kv_valid_pages, block_table,
                                   pos, slot_mapping, rope_cos, rope_sin, row_active)


def _check_write_kv_paged(k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos,
                          slot_mapping, rope_cos, rope_sin, flags, fill_mode, eps) -> None:
    _checks.check_write_kv_paged(k_pages, v_pages, kv_valid_pages, src_h, norms, wqkv, bqkv, block_table, pos,
                                 slot_mapping, rope_cos, rope_sin, flags, fill_mode)


def _check_lm_head(logits, h, final_norm, w_lm, eps) -> None:
    _checks.check_lm_head(logits, h, final_norm, w_lm)


def _check_sample_greedy(tokens, logits) -> None:
    _checks.check_sample(tokens, logits)


def _check_sample(tokens, logits, noise, temperature, top_k, top_p) -> None:
    _checks.check_sample(tokens, logits, noise)
    _checks.check_sampling(temperature, top_k, top_p)


_CHECKS = {"attn_block": _check_attn_block, "mlp_block": _check_mlp_block, "write_kv": _check_write_kv,
           "attn_block_paged": _check_attn_block_paged, "write_kv_paged": _check_write_kv_paged,
           "lm_head": _check_lm_head, "sample_greedy": _check_sample_greedy, "sample": _check_sample}


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
            cuda = _CUDA_IMPLS[name] if CUDA_OPS_AVAILABLE else _unavailable(name)
        lib.impl(name, cuda, "CUDA")
        torch.library.register_fake(f"d3k::{name}", _fake(name), lib=lib)
    return lib


_LIB = _register()
