#!/usr/bin/env bash
# Run here, before a GPU call: put what the device machine lacks into git-ignored folders that the call
# carries — Keras and the two packages it needs that the device's Python 3.12 lacks (.whl/), and the
# dataset as one archive (.devdata/), and a teacher model for distillation if TEACHER names one — then
# say whether the tree that travels fits in 64 MiB.
#   [TEACHER=MODEL.onnx] bash tools/gpu/pack.sh [DATASET_FOLDER]   (default ../shared/data/fer2013)
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:-../shared/data/fer2013}
[[ -d $data/train && -d $data/val ]] || { echo "error: $data has no train/ and val/ folders" >&2; exit 2; }

mkdir -p .whl .devdata
py=.venv/bin/python; [[ -x $py ]] || py=python3
keras_version=$($py -c 'import importlib.metadata as m; print(m.version("keras"))' 2>/dev/null || echo 3.15.1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "keras==$keras_version" namex optree
# xz: 3 MB smaller than gzip on FER2013 (46.5 vs 49.9 MB), and every MB counts against the 64 MiB.
# The archive always unpacks to fer2013/{train,val}, whatever the folder here is called.
XZ_OPT=-9 tar cJf .devdata/fer2013.tar.xz --transform "s|^$(basename "$data")|fer2013|" -C "$(dirname "$data")" "$(basename "$data")"
if [[ -n ${TEACHER:-} ]]; then
  cp "$TEACHER" .devdata/teacher.onnx
fi

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried_bytes=$(du -cb .whl .devdata | tail -1 | cut -f1)
total=$((tree_bytes + carried_bytes))
echo "tracked files $((tree_bytes / 1048576)) MiB + .whl and .devdata $((carried_bytes / 1048576)) MiB = $((total / 1048576)) MiB (limit 64)"
if ((total > 64 * 1048576)); then
  training_bytes=$(git ls-files -z training | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  echo "too large to travel: move training/ out of the checkout for the call (mv training /tmp/), and back" \
    "after; that leaves $(((total - training_bytes) / 1048576)) MiB"
fi
