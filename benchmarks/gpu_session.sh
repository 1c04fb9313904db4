#!/usr/bin/env bash
# The standing accelerator work as one prepared script: the benchmark rows
# that need a GPU, run side by side on one device within a time budget, their
# files packed into one archive. For a lent machine with a short lease: every
# job has a time limit, so the script ends (and packs what it has) within
# BUDGET_S seconds.
#
#   METALEARN_DATA_DIR=<data> bash benchmarks/gpu_session.sh <out dir>
#   SMOKE=1 ...   # a few steps of every job, to check the script on a CPU
#
# Environment: PY (the python, default python3), BUDGET_S (default 470),
# TRAIN_S (each training run's trainer.max_time_s, default 330).
#
# Jobs (each its own process; the GPU is shared by all of them, so their
# speeds are those of a shared device, and the README says so):
#   protonet_1shot   issue "Evaluation you can trust": ProtoNet 5w1s/20w1s,
#                    running batch-norm statistics, full schedule
#   protonet_5shot   the same for 5w5s/20w5s
#   metasgd_default  Meta-SGD 5w1s, step sizes all inner_lr, validated every
#   metasgd_range    1000 steps / step sizes drawn from Li et al.'s
#                    [0.005, 0.1]; the choice between them is made on
#                    validation accuracy at equal steps
#   remat            benchmarks/remat.py --isolate, meta-batch 32
#   throughput_mini  benchmarks/throughput.py --shape mini_imagenet
set -u
OUTDIR=${1:?usage: gpu_session.sh <out dir>}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-470}
TRAIN_S=${TRAIN_S:-330}
SMOKE=${SMOKE:-0}
mkdir -p "$OUTDIR"
W=$(mktemp -d)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$(dirname "$0")/.."

repro=(--curve-points 2 --override trainer.steps_per_call=10
       --max-time-s "$TRAIN_S")
train=(trainer.steps_per_call=10 "trainer.max_time_s=$TRAIN_S" logger=none
       trainer.progress=false)
metasgd=(trainer.num_steps=8000 trainer.eval_every=1000
         trainer.select=best_val trainer.checkpoint_every=1000)
bench=(--batch 32)
if [ "$SMOKE" = 1 ]; then
  repro=(--smoke --curve-points 1 --max-time-s "$TRAIN_S")
  train=(debug=smoke trainer.test_episodes=4 trainer.val_episodes=4
         logger=none trainer.progress=false)
  metasgd=(trainer.num_steps=2 trainer.eval_every=1 trainer.select=best_val
           trainer.checkpoint_every=1)
  bench=(--smoke)
fi

job() {  # job NAME COMMAND...: runs in the background, logs to $W/NAME.log
  local name=$1
  shift
  (timeout --kill-after=10 "$BUDGET_S" "$@" >"$W/$name.log" 2>&1
   echo "exit $?" >>"$W/$name.log") &
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  >"$W/gpu.txt" 2>&1
$PY -c 'import jax; print(jax.__version__, jax.devices())' >>"$W/gpu.txt" 2>&1

job protonet_1shot $PY benchmarks/reproduce.py "${repro[@]}" \
  --rows omniglot_5w1s_protonet,omniglot_20w1s_protonet \
  --checkpoint-every 5000 --out "$W/protonet_1shot"
job protonet_5shot $PY benchmarks/reproduce.py "${repro[@]}" \
  --rows omniglot_5w5s_protonet,omniglot_20w5s_protonet \
  --checkpoint-every 5000 --out "$W/protonet_5shot"
metasgd=(-m metalearn.train experiment=omniglot_5w1s_metasgd "${metasgd[@]}"
         "${train[@]}")
job metasgd_default $PY "${metasgd[@]}" name=metasgd_default \
  "hydra.run.dir=$W/metasgd_default"
job metasgd_range $PY "${metasgd[@]}" name=metasgd_range \
  "learner.inner_lr_range=[0.005,0.1]" "hydra.run.dir=$W/metasgd_range"
job remat $PY benchmarks/remat.py --isolate "${bench[@]}" \
  --out "$W/remat_gpu.json"
job throughput_mini $PY benchmarks/throughput.py --shape mini_imagenet \
  "${bench[@]/32/4}" --out "$W/throughput_mini_imagenet_gpu.json"
wait

# What comes back: one archive of everything but checkpoints, and the tails
# of the logs.
tar -C "$W" --exclude=checkpoints -czf "$OUTDIR/results.tar.gz" .
for f in "$W"/*.log; do
  echo "== $(basename "$f")"
  tail -n 25 "$f"
done
cat "$W/gpu.txt"
