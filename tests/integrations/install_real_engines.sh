#!/usr/bin/env bash
# Installs the real SGLang and vLLM wheels into the current Python environment, for
# tests/python/test_integrations_real_engines.py (moelb's adapters against the engines' own
# modules). CPU only: each wheel --no-deps (their declared dependencies pull CUDA builds of
# PyTorch and GPU kernels), then the small CPU packages their EPLB modules import, found by
# importing them on a machine without a GPU stack. PyTorch must already be installed (moelb's
# `torch` extra: pip install torch==2.13.0). triton is not installed (1 GB): the test stubs it
# while SGLang imports (see the test module's docstring).
#
#   bash tests/integrations/install_real_engines.sh [sglang.whl] [vllm.whl]
#
# Without arguments the wheels come from PyPI (pip download --no-deps: 39 MB and 336 MB).
# Tested: sglang 0.5.23, vllm 0.33.0, torch 2.13.0+cpu, Python 3.11 (docs/engines/*.md).
set -euo pipefail

SGLANG_VERSION=0.5.23
VLLM_VERSION=0.33.0
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "install_real_engines.sh: install PyTorch first (pip install torch==2.13.0)" >&2
  exit 1
fi

sglang_wheel=${1:-sglang==$SGLANG_VERSION}
vllm_wheel=${2:-vllm==$VLLM_VERSION}
"$PYTHON" -m pip install --no-deps "$sglang_wheel" "$vllm_wheel"

# What `import sglang.srt.eplb.expert_location` (and ServerArgs) needs, beyond PyTorch and NumPy.
SGLANG_IMPORTS=(orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic
  pyzmq tqdm ipython aiohttp)
# What `import vllm.distributed.eplb.policy, vllm.config.parallel` needs.
VLLM_IMPORTS=(regex cbor2 transformers openai-harmony openai)
"$PYTHON" -m pip install "${SGLANG_IMPORTS[@]}" "${VLLM_IMPORTS[@]}"

"$PYTHON" - <<'PY'
from importlib.metadata import version
print(f"installed: sglang {version('sglang')}, vllm {version('vllm')}")
PY
echo "run: python -m pytest tests/python/test_integrations_real_engines.py"
