#!/usr/bin/env bash
# Run ON the lent GPU machine, from the repo root (see docs/gpu-training.md): `ferkit train` on Keras'
# JAX backend, one run per line of RUNS_FILE, side by side on the one GPU, each stopped cleanly after
# MINUTES (SIGTERM, as at the end of a session; killed 90 s later if still busy). Each run folder comes
# back through $OUT as NAME.tar.gz (without last.keras, and without the checkpoint unless
# KEEP_CHECKPOINT=1), split into NAME.tar.gz.part-aa, -ab... where over 15 MB: at most 8 files come
# back, 16 MB each, 64 MB in all. The archives are also rewritten every SNAPSHOT_S seconds (default 60)
# while the runs train, so that a call cut short by its limit still brings back the runs as they were.
#   bash tools/gpu/train.sh MINUTES RUNS_FILE
# RUNS_FILE: "NAME ferkit-train-flags..." per line; --data, --val and --out are added.
set -uo pipefail
minutes=${1:?minutes}; runs_file=${2:?runs file}
out=${OUT:?OUT must name the folder whose files come back}
work=$(mktemp -d)
runs=$work/runs; data=$work/data
mkdir -p "$runs" "$data"

export KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false  # another backend: for tests here
keras_says="import keras; print('keras', keras.__version__, keras.backend.backend())"
if ! python3 -c "$keras_says" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  python3 -c "$keras_says" || exit 1
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" .devdata/fer2013.tar.xz "$data" || exit 1
[[ $KERAS_BACKEND == jax ]] && python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

excluded=(--exclude last.keras --exclude '.*.tmp.keras')
[[ ${KEEP_CHECKPOINT:-0} == 1 ]] || excluded+=(--exclude checkpoint.keras --exclude backup --exclude backup-fine-tune)

pack_run() {  # NAME: its run folder and log into $OUT, replacing what an earlier snapshot left there
  local name=$1 tmp="$out/$1.tar.gz.tmp"
  [[ -d $runs/$name ]] || return 0
  cp "$runs/$name.log" "$runs/$name/train.log" 2>/dev/null
  tar czf "$tmp" "${excluded[@]}" -C "$runs" "$name" 2>/dev/null
  (( $? < 2 )) || { rm -f "$tmp"; return 0; }  # 1: a file changed while read (the log); 2: failed
  rm -f "$out/$name.tar.gz" "$out/$name.tar.gz.part-"*
  if (( $(stat -c %s "$tmp") > 15 * 1048576 )); then
    split -b 15m "$tmp" "$out/$name.tar.gz.part-" && rm "$tmp"
  else
    mv "$tmp" "$out/$name.tar.gz"
  fi
}

started=$(date +%s)
names=(); pids=()
while read -r name flags; do
  [[ -z ${name:-} || $name == \#* ]] && continue
  names+=("$name")
  # shellcheck disable=SC2086  # flags are meant to split
  PYTHONUNBUFFERED=1 timeout -s TERM -k 90s "${minutes}m" python3 -m ferkit train --data "$data/fer2013/train" \
    --val "$data/fer2013/val" --out "$runs/$name" $flags >"$runs/$name.log" 2>&1 &
  pids+=($!)
done <"$runs_file"
(( ${#names[@]} )) || { echo "error: no runs in $runs_file" >&2; exit 2; }
( while sleep "${SNAPSHOT_S:-60}"; do for name in "${names[@]}"; do pack_run "$name"; done; done ) &
snapshots=$!
wait "${pids[@]}"
kill "$snapshots" 2>/dev/null; wait "$snapshots" 2>/dev/null
echo "trained for $(( $(date +%s) - started )) s"

for name in "${names[@]}"; do
  tail -n 3 "$runs/$name.log"
  pack_run "$name"
done
ls -la "$out"
