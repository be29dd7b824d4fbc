#!/usr/bin/env bash
# Wheels for tools/gpu/gpu_check.sh: what a GPU machine without package-index access lacks, for its
# Python, into .whl/ (ignored by git).
#
# Run on a CPU machine with the project's venv (`make setup`) and the package index reachable:
#     tools/gpu/prepare_gpu_wheels.sh            # PYTHON_VERSION=3.12 WHEELS=.whl by default
# The GPU machine is assumed to have torch, numpy, scipy, pillow, pytest, typer, safetensors and
# psutil (a usual CUDA image); these are the rest, at the versions this venv runs. DeepSpeed is
# built here as a pure-Python wheel (DS_BUILD_OPS=0), as `make setup` installs it. The folder stays
# small (about 12 MB) so it can travel with the repository copy to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WHEELS=${WHEELS:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PACKAGES=(diffusers webdataset braceexpand hjson pydantic pydantic_core annotated-types typing-inspection
          importlib_metadata huggingface_hub clean-fid)

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
pins=()
for name in "${PACKAGES[@]}"; do pins+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "${pins[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$(version deepspeed)"
ls "$WHEELS" > "$WHEELS/MANIFEST.txt"
du -sh "$WHEELS"
