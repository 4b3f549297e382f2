#!/usr/bin/env bash
# Wheels that the lent GPU machine's image lacks (it cannot reach a package index), downloaded here into .whl/
# (ignored by git) for its Python 3.12: peft and transformers at the versions of the Python that runs this script.
# The image already holds torch, triton, accelerate, safetensors, tokenizers and huggingface_hub; the GPU tests
# and benchmarks need neither trl nor datasets. Then: bash benchmarks/gpu_session.sh (see there), carrying .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "peft==$(version peft)" "transformers==$(version transformers)"
ls -l .whl
