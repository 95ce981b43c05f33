#!/bin/bash
# How the large default-model candidate is trained on a CPU: a chain of stages, each resuming its run
# folder, so that the whole chain can be stopped at any time and started again with the same command:
#
#     bash training/campaign.sh          (runs in $FERKIT_RUNS, default ~/ferkit-runs)
#
# 1. ferkit-net-l-v1: ferkit-net-l, 150-epoch cosine. Stopped after epoch 127 (STOPPED in its folder): val
#    peaked at epoch 83 (0.6963) and fell to 0.680 by epoch 127 while train accuracy rose to 0.89. Its
#    best.keras was lost when the run moved machines (a pack keeps the last epoch only), so later stages
#    use L_AVG: the mean of its packs at epochs 50, 67, 92, 96 and 120 and its last model
#    (tools/average_checkpoints.py, batch norm re-measured), val 0.6916 one view, 0.6977 ten-crop; its
#    last model alone scored 0.6796. The packs are in git history (training/ferkit-net-l-v1 at 9d5b85b,
#    4f3db10, 0eb2504, 55ab31d and 70e41c9).
# 2. ferkit-resnet18-h-v1: a second family for the teacher, 40-epoch cosine with mixup 0.2 (l overfitted
#    from about epoch 85 of 150). Finished: val 0.6601 one view, 0.6637 ten-crop; train accuracy 0.67, still
#    rising at the end (it underfits at 40 epochs). Epochs took 1,100-2,650 s in float32 on an AVX2 machine and
#    ~290 s in bfloat16 on one with AVX-512 BF16.
# 3. The teacher: every training face's probabilities, averaged over l and r18h (ten-crop each, recorded
#    at their float ONNX export) and the shipped default pair (as it ships). Each model's share is saved as
#    it is made, then averaged. L_AVG was later rebuilt without its last model (0.6957 ten-crop); on val
#    the teacher scores 0.6994 (l + r18h 0.6985), fear recall 0.47.
# 4. ferkit-net-l-distilled-v1: ferkit-net-l from L_AVG's weights, trained on the teacher (--distill 0.7).
#    Stopped after epoch 44 of 60 (STOPPED): val peaked at epoch 23 (0.6985) and fell to 0.6868 while
#    train accuracy rose to 0.88, fitting the teacher's fixed training-set probabilities. Its best.keras is
#    the shipped default (0.6966 as shipped, int8). A 0.70 teacher cannot lift a student to 73%, so the
#    stages after it train stronger teacher members:
# 5. ferkit-net-l-v2: l again with mixup 0.4, which l-v1 lacked (train 0.87 against val 0.69 at epoch
#    120), and 120 epochs, since l-v1 peaked at epoch 83 of 150. Finished: val 0.6966 at epoch 110, 0.6910
#    at 120 (train 0.76 on mixed faces): no overfitting, and no higher than l-v1's peak.
# 6. The second teacher: the first one's saved probabilities (git history: r18h-v1's weights were lost with
#    a machine) and l-v2's, ten-crop, half each. l-v2 counts as the mean of its models at epochs 100-120
#    (every 5th, kept by --save-period) where that scores higher on val, one view, than its best model. The
#    run moved machines at epoch 112, which lost the snapshots before epoch 115, so the member is its best model.
# 7. ferkit-net-l-distilled-v2: ferkit-net-l from that l-v2 member, trained on the second teacher with
#    mixup 0.4, which the first student lacked when it fitted its teacher's fixed probabilities. Finished:
#    val fell from 0.6941 (epoch 1) to 0.6812 (epoch 23) while the learning rate was high, then rose to
#    0.6966 at epoch 47 (0.6963 at 50, train 0.79 on mixed faces): no overfitting, no gain over the first.
# 8. ferkit-resnet18-h-v2: r18h for 120 epochs in place of 40, with mixup 0.4, for a third teacher. Cut to 100
#    epochs after epoch 92 (val 0.6885, its best): on an AVX-512 BF16 machine epochs 93-107 had gained 0.14 points
#    (best 0.6899 at epoch 106, in a run folder lost with that machine), and the run moved to an AVX2 machine, where
#    an epoch costs about five times as much in float32. The cosine schedule then ends at epoch 100 instead.
#    Finished: val 0.6885 at epoch 92, 0.6854 at 100 (train 0.73 on mixed faces).
# 9. The third teacher: the second teacher's saved probabilities and r18h-v2's (ten-crop; its member chosen
#    as l-v2's was), half each. The l runs make much the same mistakes (l-v2 averaged with the default
#    gains less than a point), so the other family gets half the say. Ending at epoch 100, r18h-v2 has one
#    snapshot from epoch 100 on, so its member is its best model.
# 10. ferkit-net-l-distilled-v3: the second student's recipe, from the default model (its Keras twin, shipped
#    with ferkit), trained on the third teacher: what a stronger teacher alone is worth.
cd "$(dirname "$0")/.."
if grep -q avx512_bf16 /proc/cpuinfo; then P=mixed_bfloat16; else P=float32; fi  # bf16 is slow without it
R=${FERKIT_RUNS:-~/ferkit-runs}
DATA=${FER2013_TRAIN:-../shared/data/fer2013/train}
VAL=${FER2013_VAL:-../shared/data/fer2013/val}
FERKIT=.venv/bin/ferkit
# Keep freed memory in the process: glibc hands each freed block over 32 MB (a batch's activations) back
# to the kernel and faults it in again on the next step. Measured on a 2-core AVX2 EPYC with mixup's batch
# feed: page faults 114,000/s -> 1/s, kernel time 12% -> 0.5%; per epoch (benchmarks/epoch_time.py --input
# batches) 1,211 s against 1,563 and 1,643 when the host ran fast, no difference when it was throttled.
export MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456
stage_done() { grep -q '"status": "finished"' "$1/state.json" 2>/dev/null || [ -f "$1/STOPPED" ]; }
# Every 5th epoch's model is kept in the run's epochs/ folder, to average the last few (tools/average_checkpoints.py).
run_stage() {  # run folder, epochs in all, then the other flags of a fresh start
  local run=$1 epochs=$2; shift 2
  stage_done $run && return 0
  if [ -f $run/config.json ]; then
    $FERKIT train --resume $run --epochs $epochs --precision $P --save-period 5 >> $run.log 2>&1
  else
    $FERKIT train "$@" --epochs $epochs --precision $P --save-period 5 --out $run >> $run.log 2>&1
  fi
  stage_done $run
}
L_AVG=$R/ferkit-net-l-v1-averaged.keras
COMMON="--data $DATA --val $VAL --batch-size 128 --optimizer sgd --weight-decay 5e-3 --lr-schedule cosine --ema 0.999 --label-smoothing 0.1 --class-weight sqrt --augment flip,crop,rotate,zoom,erase"
run_stage $R/ferkit-net-l-v1 150 || exit 1
run_stage $R/ferkit-resnet18-h-v1 40 --model ferkit-resnet18-h $COMMON --lr 0.05 --warmup-epochs 3 --mixup 0.2 --seed 41 || exit 1
teacher_part() {  # name, model: the model's ten-crop ONNX export, then its probabilities, each kept once made
  [ -f $R/teacher-$1.npz ] && return 0
  [ -f $R/teacher-$1.onnx ] || $FERKIT export $2 --onnx --tta tencrop --out $R/teacher-$1.onnx >> $R/teacher.log 2>&1 || return 1
  $FERKIT teacher $R/teacher-$1.onnx --data $DATA --out $R/teacher-$1.npz >> $R/teacher.log 2>&1
}
# The recorded teacher had a third member, the shipped model of that time (the pair ferkit-net-s-x2, 0.6994
# with it, 0.6985 without). ferkit no longer ships the pair, and "default" is now this stage's own student,
# so the teacher is made again from l and r18h alone, and only where its student has not run yet.
if ! stage_done $R/ferkit-net-l-distilled-v1 && [ ! -f $R/teacher-l-r18h.npz ]; then
  teacher_part l $L_AVG || exit 1
  teacher_part r18h $R/ferkit-resnet18-h-v1 || exit 1
  $FERKIT teacher $R/teacher-l.npz $R/teacher-r18h.npz --data $DATA --out $R/teacher-l-r18h.npz >> $R/teacher.log 2>&1 || exit 1
fi
run_stage $R/ferkit-net-l-distilled-v1 60 --model ferkit-net-l --init $L_AVG --teacher $R/teacher-l-r18h.npz --distill 0.7 $COMMON --lr 0.02 --warmup-epochs 2 --seed 42 || exit 1
run_stage $R/ferkit-net-l-v2 120 --model ferkit-net-l $COMMON --lr 0.05 --warmup-epochs 3 --mixup 0.4 --seed 43 || exit 1
val_accuracy() {  # model: its accuracy on $VAL, one view
  $FERKIT evaluate $1 --data $VAL --tta none --json --overwrite --out $R/val-$(basename $1 .keras) 2>> $R/teacher.log |
    .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["accuracy"])'
}
member_model() {  # run folder, file: the run's member of a teacher, a copy of the chosen model
  [ -f $2 ] && return 0
  local run=$1 out=$2 tail=$1-averaged.keras
  local snapshots=$(ls $run/epochs/epoch-1[01][05].keras $run/epochs/epoch-120.keras 2>/dev/null)
  if [ $(echo $snapshots | wc -w) -ge 3 ]; then
    [ -f $tail ] || .venv/bin/python tools/average_checkpoints.py $snapshots --calibration $DATA --out $tail >> $R/teacher.log 2>&1 || return 1
    local a=$(val_accuracy $tail) b=$(val_accuracy $run/best.keras)
    echo "$(basename $run) member: tail average $a, best model $b (val, one view)" >> $R/teacher.log
    if .venv/bin/python -c "import sys; sys.exit(not $a > $b)"; then cp $tail $out; return; fi
  fi
  cp $run/best.keras $out
}
L2=$R/ferkit-net-l-v2-member.keras  # the l-v2 member of the second teacher
saved_teacher() {  # name, commit, run: a teacher's saved probabilities, as committed with the run of its student
  [ -f $R/teacher-$1.npz ] && return 0
  git show $2:training/$3/teacher-$1.npz > $R/teacher-$1.npz.part && mv $R/teacher-$1.npz.part $R/teacher-$1.npz
}
if ! stage_done $R/ferkit-net-l-distilled-v2 && [ ! -f $R/teacher-2.npz ]; then
  saved_teacher l-r18h 8e20c2c ferkit-net-l-distilled-v1 || exit 1
  member_model $R/ferkit-net-l-v2 $L2 && teacher_part l2 $L2 || exit 1
  $FERKIT teacher $R/teacher-l-r18h.npz $R/teacher-l2.npz --data $DATA --out $R/teacher-2.npz >> $R/teacher.log 2>&1 || exit 1
fi
run_stage $R/ferkit-net-l-distilled-v2 50 --model ferkit-net-l --init $L2 --teacher $R/teacher-2.npz --distill 0.7 $COMMON --lr 0.02 --warmup-epochs 2 --mixup 0.4 --seed 45 || exit 1
run_stage $R/ferkit-resnet18-h-v2 100 --model ferkit-resnet18-h $COMMON --lr 0.05 --warmup-epochs 3 --mixup 0.4 --seed 44 || exit 1
R18H2=$R/ferkit-resnet18-h-v2-member.keras
if ! stage_done $R/ferkit-net-l-distilled-v3 && [ ! -f $R/teacher-3.npz ]; then
  saved_teacher 2 da192c8 ferkit-net-l-distilled-v2 || exit 1
  member_model $R/ferkit-resnet18-h-v2 $R18H2 && teacher_part r18h2 $R18H2 || exit 1
  $FERKIT teacher $R/teacher-2.npz $R/teacher-r18h2.npz --data $DATA --out $R/teacher-3.npz >> $R/teacher.log 2>&1 || exit 1
fi
run_stage $R/ferkit-net-l-distilled-v3 50 --model ferkit-net-l --init default --teacher $R/teacher-3.npz --distill 0.7 $COMMON --lr 0.02 --warmup-epochs 2 --mixup 0.4 --seed 46 || exit 1
