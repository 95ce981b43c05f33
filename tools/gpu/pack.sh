#!/usr/bin/env bash
# Prepare a GPU machine without internet access for tools/gpu/train.sh (see docs/gpu-training.md):
# download the Keras wheels for its Python into .whl/ (Keras and the packages it needs beyond JAX, NumPy
# and ml_dtypes, which JAX brings), and pack a dataset folder with train/ and val/ into one archive,
# .devdata/DATASET.tar.xz, to copy over with the checkout. Prints what was written and its size.
#
#   bash tools/gpu/pack.sh DATASET_FOLDER [PYTHON_VERSION]     (PYTHON_VERSION of the GPU machine, default 3.12)
set -euo pipefail
data=${1:?usage: pack.sh DATASET_FOLDER [PYTHON_VERSION]}
python_version=${2:-3.12}
[[ -d $data/train && -d $data/val ]] || { echo "error: $data has no train/ and val/ folders" >&2; exit 2; }
data=$(cd "$data" && pwd)
cd "$(dirname "$0")/../.."

mkdir -p .whl .devdata
py=.venv/bin/python; [[ -x $py ]] || py=python3
keras_version=$($py -c 'import importlib.metadata as m; print(m.version("keras"))' 2>/dev/null || echo 3.15.1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "keras==$keras_version" absl-py h5py namex optree typing-extensions packaging rich markdown-it-py mdurl pygments
# xz: FER2013 packs to 46.5 MB (gzip: 49.9 MB)
name=$(basename "$data")
XZ_OPT=-9 tar cJf ".devdata/$name.tar.xz" -C "$(dirname "$data")" "$name"
du -sh .whl ".devdata/$name.tar.xz"
echo "on the GPU machine: bash tools/gpu/train.sh --wheels .whl MINUTES RUNS_FILE .devdata/$name.tar.xz OUT"
