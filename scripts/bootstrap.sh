#!/usr/bin/env bash
# Creates (or reuses) the project's virtualenv and installs what the tests need.
# An existing torch is kept; without one, a GPU-less machine gets the CPU wheel
# (never a multi-GB CUDA build pulled in as a side effect).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    # System site-packages stay visible so that a torch installed on the machine is reused.
    "$python" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

"${pip[@]}" --upgrade "pip>=23" "setuptools>=77" wheel

if "$py" -c "import torch" 2>/dev/null; then
    echo "bootstrap: keeping installed torch $("$py" -c 'import torch; print(torch.__version__)')"
elif nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
else
    echo "bootstrap: no torch and no GPU: installing the CPU wheel torch==2.13.0"
    "${pip[@]}" torch==2.13.0
fi

if ! "$py" -c "import triton" 2>/dev/null; then
    "${pip[@]}" triton==3.6.0
fi
# The Triton interpreter (CPU kernel tests) needs numpy < 2.4.
"${pip[@]}" "numpy<2.4"
# No build isolation: setup.py imports torch to decide on the CUDA extension, and an isolated build
# environment would download a fresh (CUDA) torch.
"${pip[@]}" --no-build-isolation -e ".[test]"
"$py" -c "import torch, triton, numpy; print(f'bootstrap: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
