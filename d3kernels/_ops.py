"""The only module that imports the compiled CUDA backend ``d3kernels._C``.

``C`` is the extension module, or None when it is unavailable; ``C_ERROR`` then
says why. Importing this module never needs _C or a GPU.
"""
from __future__ import annotations

import importlib

C_ERROR: str | None = None
try:
    _C = importlib.import_module("d3kernels._C")
except ModuleNotFoundError as e:
    if e.name != "d3kernels._C":
        raise
    _C = None
    C_ERROR = ("d3kernels._C is not built: no nvcc was found at install time, or "
               "D3K_SKIP_CUDA_BUILD=1 was set (install the CUDA 13 toolkit, set "
               "CUDA_HOME=/usr/local/cuda and reinstall: pip install --no-build-isolation -e .)")
except ImportError as e:  # built but unloadable: wrong Python, missing symbol, ...
    _C = None
    C_ERROR = f"d3kernels._C failed to import (rebuild it on this machine): {e}"

C = _C or None


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
