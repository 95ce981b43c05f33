#!/usr/bin/env bash
# Train several ferkit models side by side on one GPU machine, from the repository root, with Keras'
# JAX backend (see docs/gpu-training.md):
#
#   bash tools/gpu/train.sh [--keep-checkpoint] [--split-mb N] [--snapshot-s S] [--wheels DIR] \
#       [--overwrite] MINUTES RUNS_FILE DATA OUT
#
# RUNS_FILE: one run per line, "NAME ferkit-train-flags..."; --data, --val and --out are added.
# DATA: a folder with train/ and val/ class folders, or a .tar.xz archive of one (as tools/gpu/pack.sh
# makes). Every run stops cleanly after MINUTES (SIGTERM: the epoch under way is dropped and the run
# folder stays resumable; killed 90 s later if still busy). Each run folder and its log are written to
# OUT as NAME.tar.gz, without last.keras, and without the training checkpoint unless --keep-checkpoint
# (needed to continue the run elsewhere); rewritten every S seconds (default 60) while the runs train,
# so that a job killed early still leaves the runs as they stood. --split-mb N splits archives larger
# than N MB into NAME.tar.gz.part-aa, -ab, ... --wheels DIR installs Keras from the wheels in DIR when
# it is missing (an offline machine; tools/gpu/pack.sh downloads them). Archives of an earlier job in
# OUT under a name of RUNS_FILE are refused before anything starts, unless --overwrite. Exits 1 if a run
# failed (other than stopping at MINUTES), naming it; its log is archived all the same.
set -uo pipefail
keep_checkpoint=0; split_mb=0; snapshot_s=60; wheels=""; overwrite=0
while [[ ${1:-} == --* ]]; do
  case $1 in
    --keep-checkpoint) keep_checkpoint=1; shift ;;
    --overwrite) overwrite=1; shift ;;
    --split-mb) split_mb=${2:?--split-mb N}; shift 2 ;;
    --snapshot-s) snapshot_s=${2:?--snapshot-s S}; shift 2 ;;
    --wheels) wheels=${2:?--wheels DIR}; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
(( $# == 4 )) || { echo "usage: train.sh [options] MINUTES RUNS_FILE DATA OUT" >&2; exit 2; }
minutes=$1; runs_file=$2; data_source=$3; out=$4
[[ -f $runs_file ]] || { echo "error: no such runs file: $runs_file" >&2; exit 2; }
if (( ! overwrite )); then
  while read -r name _ || [[ -n ${name:-} ]]; do
    [[ -z ${name:-} || $name == \#* ]] && continue
    if compgen -G "$out/$name.tar.gz*" >/dev/null; then
      echo "error: $out already holds $name.tar.gz of an earlier job: choose another OUT, or --overwrite" >&2; exit 2
    fi
  done <"$runs_file"
fi
mkdir -p "$out" || exit 2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # the dataset's copy and the runs, archived in OUT by then
runs=$work/runs
mkdir -p "$runs"

export KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false  # several runs share the GPU
keras_says="import keras; print('keras', keras.__version__, keras.backend.backend())"
if ! python3 -c "$keras_says" 2>/dev/null; then
  [[ -n $wheels ]] || { echo "error: Keras is not installed (pip install 'ferkit[train]', or --wheels DIR)" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "$wheels"/*.whl || exit 1
  export PYTHONPATH=$work/site
  python3 -c "$keras_says" || exit 1
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if [[ -d $data_source ]]; then
  data=$data_source
else
  python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$data_source" "$work/data" || exit 1
  data=$(dirname "$(find "$work/data" -maxdepth 3 -type d -name train | head -1)")
fi
[[ -d $data/train && -d $data/val ]] || { echo "error: $data_source has no train/ and val/ folders" >&2; exit 2; }
[[ $KERAS_BACKEND == jax ]] && python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

excluded=(--exclude last.keras --exclude '.*.tmp.keras')
(( keep_checkpoint )) || excluded+=(--exclude checkpoint.keras --exclude backup --exclude backup-fine-tune)

pack_run() {  # NAME [ended]: its run folder and log into $out, replacing what an earlier snapshot left there
  local name=$1 tmp="$out/$1.tar.gz.tmp"
  if [[ -d $runs/$name ]]; then
    cp "$runs/$name.log" "$runs/$name/train.log" 2>/dev/null
    tar czf "$tmp" "${excluded[@]}" -C "$runs" "$name" 2>/dev/null
  elif [[ ${2:-} == ended ]]; then  # a run that failed before its folder was made: its log says why
    tar czf "$tmp" -C "$runs" "$name.log" 2>/dev/null
  else
    return 0
  fi
  (( $? < 2 )) || { rm -f "$tmp"; return 0; }  # 1: a file changed while read (the log); 2: failed
  rm -f "$out/$name.tar.gz" "$out/$name.tar.gz.part-"*
  if (( split_mb > 0 && $(stat -c %s "$tmp") > split_mb * 1048576 )); then
    split -b "${split_mb}m" "$tmp" "$out/$name.tar.gz.part-" && rm "$tmp"
  else
    mv "$tmp" "$out/$name.tar.gz"
  fi
}

started=$(date +%s)
names=(); pids=()
while read -r name flags || [[ -n ${name:-} ]]; do  # the last line may lack its newline
  [[ -z ${name:-} || $name == \#* ]] && continue
  names+=("$name")
  # shellcheck disable=SC2086  # flags are meant to split
  PYTHONUNBUFFERED=1 timeout -s TERM -k 90s "${minutes}m" python3 -m ferkit train --data "$data/train" \
    --val "$data/val" --out "$runs/$name" $flags >"$runs/$name.log" 2>&1 &
  pids+=($!)
done <"$runs_file"
(( ${#names[@]} )) || { echo "error: no runs in $runs_file" >&2; exit 2; }
# TERM ends the snapshot loop between archives, never during one: bash runs the trap once tar is done
( trap 'exit 0' TERM
  while :; do sleep "$snapshot_s" & wait $!; for name in "${names[@]}"; do pack_run "$name"; done; done ) &
snapshots=$!
failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; status=$?
  (( status == 0 || status == 124 )) || failed+=("${names[$i]} (exit $status)")  # 124: stopped at MINUTES
done
kill "$snapshots" 2>/dev/null; wait "$snapshots" 2>/dev/null
echo "trained for $(( $(date +%s) - started )) s"

for name in "${names[@]}"; do
  tail -n 3 "$runs/$name.log"
  pack_run "$name" ended
done
ls -la "$out"
if (( ${#failed[@]} )); then
  echo "error: failed: ${failed[*]}; their logs are in their archives in $out" >&2
  exit 1
fi
