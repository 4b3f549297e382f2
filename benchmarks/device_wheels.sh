#!/usr/bin/env bash
# The one wheel the lent GPU machine's image lacks (it cannot reach a package index), downloaded here into .whl/
# (ignored by git) for its Python 3.12: peft, at the version of the Python that runs this script (pure Python,
# 0.8 MiB for 0.21.2). The image already holds torch, triton, transformers (its own version is used: no newer one is
# carried), accelerate, safetensors, tokenizers, huggingface_hub, pytest and pytest-xdist; the GPU tests and
# benchmarks need neither trl nor datasets. Then: bash benchmarks/gpu_session.sh all (see there), carrying .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "peft==$(version peft)"
ls -l .whl
