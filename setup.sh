#!/usr/bin/env bash
# Set up minBERT in the active Python environment (a virtualenv is recommended).
#
# torch first: an installed torch is kept; on a machine with an NVIDIA GPU pip's default (CUDA)
# build is installed; elsewhere the CPU build, so no multi-GB CUDA wheel is ever pulled there.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif [ -n "${TORCH_SPEC:-}" ]; then
  pip_install "$TORCH_SPEC"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
  pip_install torch
else
  echo "setup: no CUDA device, installing the CPU build of torch"
  # The CPU wheel carries the local version '+cpu': from a local wheel house or PyTorch's CPU index.
  pip_install "torch==2.13.0+cpu" 2>/dev/null \
    || pip_install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi

pip_install -e ".[dev]"
# Hugging Face's "kernels" distribution (a dependency of transformers >= 5.25, excluded in setup.py)
# installs a top-level package named like ours and shadows it: remove it if an earlier install left it.
if "$PY" -m pip show kernels 2>/dev/null | grep -q "^Home-page: .*huggingface\|^Author.*[Hh]ugging"; then
  echo "setup: removing Hugging Face's 'kernels' package (its import name clashes with this project's kernels/)"
  "$PY" -m pip uninstall --disable-pip-version-check -y kernels
fi
"$PY" -c "import torch, triton, deepspeed, kernels, minbert; assert hasattr(kernels, 'attention_varlen'), f'import kernels found {kernels.__file__}, not this project'; print('setup: ok, torch', torch.__version__, '| triton', triton.__version__, '| deepspeed', deepspeed.__version__, '| kernels backend', kernels.get_backend())"
