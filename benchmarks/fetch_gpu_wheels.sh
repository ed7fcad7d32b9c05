#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh needs on the GPU machine (Python 3.12, x86-64,
# no package registry) and print their total size.
#
#   bash benchmarks/fetch_gpu_wheels.sh WHEELS_DIR      # e.g. .whl (ignored by git)
#
# That machine has torch, CuPy, scipy, numpy, PyYAML, tqdm, matplotlib, tensorboard, torchmetrics,
# pytest, pytest-timeout and hypothesis (/work/.library/device/KINDS.md) but not MONAI, nibabel or
# pydantic. pydantic 2.14 needs typing-extensions >= 4.16, newer than the machine may have.
# Not fetched: SimpleITK (~50 MB; segcalib imports it only to read non-NIfTI files, and no CUDA
# test or benchmark does) and segmentation-models-pytorch (imported only to build an smp model).
# Versions are those of the reference environment (docs/benchmarks.md).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/fetch_gpu_wheels.sh WHEELS_DIR" >&2
    exit 2
fi
DEST=$1
PY=${PYTHON:-python3}
WHEELS=(
    monai==1.6.1
    nibabel==5.4.2
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"/*.whl | awk '{print $5, $NF}'
du -cb "$DEST"/*.whl | tail -n 1 | awk '{printf "total: %.1f MiB in %s\n", $1 / 1048576, "'"$DEST"'"}'
