#!/usr/bin/env bash
# Fill .whl/ (project root, git-ignored) with the wheels the offline GPU image lacks, for
# benchmarks/gpu/gpu_validate.sh to install there: DeepSpeed (a source archive on PyPI: built here into a
# pure-Python wheel, its ops JIT-build where used; the project uses torch's fused AdamW, which needs none),
# hjson and py-cpuinfo (DeepSpeed's dependencies). The image has torch, transformers, tokenizers, pyarrow,
# numpy, pydantic, psutil, ninja, msgpack, einops and pytest.
# Run on a machine with network, from anywhere in the project:
#   bash benchmarks/gpu/gpu_wheels.sh [extra-requirement ...]      # e.g. datasets==5.2.0 for hub inputs
# Then carry .whl/ to the GPU machine (it is git-ignored, so name it explicitly).
set -euo pipefail
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PY=${PY:-python3}
TARGET_PY=${TARGET_PY:-3.12}  # the GPU image's Python
mkdir -p .whl
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps -q -w .whl "deepspeed==0.19.8"
"$PY" -m pip download --no-deps -q -d .whl --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  hjson py-cpuinfo "$@"
ls -la .whl
