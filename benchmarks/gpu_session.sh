#!/usr/bin/env bash
# The standing accelerator work as one prepared script: the benchmark rows
# that need a GPU, run side by side on one device within a time budget, their
# files packed into one archive. For a lent machine with a short lease: every
# job has a time limit, so the script ends (and packs what it has) within
# BUDGET_S seconds.
#
#   METALEARN_DATA_DIR=<data> bash benchmarks/gpu_session.sh <out dir>
#   JOBS="protonet_1shot remat" ...   # choose the jobs (default: $DEFAULT_JOBS)
#   SMOKE=1 ...   # a few steps of every job, to check the script on a CPU
#
# Environment: PY (the python, default python3), BUDGET_S (default 470),
# TRAIN_S (each training run's trainer.max_time_s, default 330), STATE (the
# folder of the long runs, default .devruns; carry it to the device and
# unpack the returned devruns.tar.gz into it to continue them).
#
# Jobs (each its own process; the GPU is shared by all of them, so their
# speeds are those of a shared device, and the README says so):
#   protonet_1shot   ProtoNet 5w1s/20w1s, running batch-norm statistics,
#                    full schedule (run 2026-12-04)
#   protonet_5shot   the same for 5w5s/20w5s (run 2026-12-04)
#   metasgd_init     Meta-SGD 5w1s twice, 8000 steps, validated every 1000:
#                    step sizes all inner_lr against drawn from Li et al.'s
#                    [0.005, 0.1] (run 2026-12-04)
#   remat            benchmarks/remat.py --isolate, meta-batch 32
#   throughput_mini  benchmarks/throughput.py --shape mini_imagenet
#   population       benchmarks/population.py: a sweep as one program,
#                    aggregate tasks/s of 1, 4, 16, 64 vmapped members
#   row:EXPERIMENT[:OVERRIDE...]
#                    a paper row on its full schedule, TRAIN_S seconds per
#                    session: resumed from $STATE/<row> (reproduce.py
#                    --continue-stopped), its last checkpoint kept there and
#                    packed into devruns.tar.gz for the next session
set -u
OUTDIR=${1:?usage: gpu_session.sh <out dir>}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-470}
TRAIN_S=${TRAIN_S:-330}
SMOKE=${SMOKE:-0}
STATE=${STATE:-.devruns}
# The next standing work: the MAML family's rows on full schedules, MAML
# with the non-transductive support statistics first; then iMAML's first
# row, ProtoNet on the Omniglot challenge protocol (Lake et al.'s split,
# within-alphabet episodes; its experiment file's CPU schedule stretched to
# 20000 steps, the rate halved every 2000 as Snell et al.), the population
# throughput, and ProtoNet on the in-context learner's 20-way schedule (the
# in-context rows ran whole on the CPU; ProtoNet on the 5-way one did too).
# iMAML's 5w1s run in the authors' form (the experiment file's since
# 2026-12-05) reached 6200 of 20000 steps on the CPU, but its checkpoints
# did not outlive that machine: the row starts afresh. (The earlier CPU
# run, in the paper's form, did not train.)
DEFAULT_JOBS="row:omniglot_5w1s_maml:model.norm=support
  row:omniglot_5w1s_r2d2 row:omniglot_20w1s_r2d2
  row:omniglot_5w1s_metasgd row:omniglot_20w1s_maml row:omniglot_20w1s_anil
  row:omniglot_5w5s_maml row:omniglot_20w1s_metasgd row:omniglot_5w1s_imaml
  row:omniglot_lake_20w1s_protonet:trainer.num_steps=20000:optimizer.learning_rate.transition_steps=2000
  population
  row:omniglot_20w1s_incontext:learner=protonet:~learner.max_ways:~learner.dim:~learner.depth:~learner.num_heads:~learner.mlp_ratio:~learner.permute_labels:name=omniglot_20w1s_incontext-schedule_protonet"
JOBS=${JOBS:-$DEFAULT_JOBS}
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

metasgd=(-m metalearn.train experiment=omniglot_5w1s_metasgd "${metasgd[@]}"
         "${train[@]}")
cd_state() { mkdir -p "$STATE" && (cd "$STATE" && pwd); }
STATE=$(cd_state)

for spec in $JOBS; do
  case $spec in
    protonet_1shot)
      job protonet_1shot $PY benchmarks/reproduce.py "${repro[@]}" \
        --rows omniglot_5w1s_protonet,omniglot_20w1s_protonet \
        --checkpoint-every 5000 --out "$W/protonet_1shot" ;;
    protonet_5shot)
      job protonet_5shot $PY benchmarks/reproduce.py "${repro[@]}" \
        --rows omniglot_5w5s_protonet,omniglot_20w5s_protonet \
        --checkpoint-every 5000 --out "$W/protonet_5shot" ;;
    metasgd_init)
      job metasgd_default $PY "${metasgd[@]}" name=metasgd_default \
        "hydra.run.dir=$W/metasgd_default"
      job metasgd_range $PY "${metasgd[@]}" name=metasgd_range \
        "learner.inner_lr_range=[0.005,0.1]" "hydra.run.dir=$W/metasgd_range"
      ;;
    remat)
      job remat $PY benchmarks/remat.py --isolate "${bench[@]}" \
        --out "$W/remat_gpu.json" ;;
    throughput_mini)
      job throughput_mini $PY benchmarks/throughput.py --shape mini_imagenet \
        "${bench[@]/32/4}" --out "$W/throughput_mini_imagenet_gpu.json" ;;
    population)
      if [ "$SMOKE" = 1 ]; then pop=(--smoke); else
        pop=(--sizes 1,4,16,64 --member-map vmap --batch 32); fi
      job population $PY benchmarks/population.py "${pop[@]}" \
        --out "$W/population_gpu.json" ;;
    row:*)
      IFS=: read -r -a parts <<<"${spec#row:}"
      label=$(IFS=_; echo "${parts[*]}" | tr -c 'A-Za-z0-9_.\n-' '_')
      overrides=()
      for o in "${parts[@]:1}"; do overrides+=(--override "$o"); done
      job "$label" $PY benchmarks/reproduce.py "${repro[@]}" \
        --rows "${parts[0]}" --continue-stopped --checkpoint-every 1000 \
        --curve-points 1 "${overrides[@]}" --out "$STATE/$label" ;;
    *) echo "unknown job $spec" >&2; exit 2 ;;
  esac
done
wait

# What comes back: one archive of everything but checkpoints, the long
# runs with their last checkpoint only, and the tails of the logs.
tar -C "$W" --exclude=checkpoints -czf "$OUTDIR/results.tar.gz" .
for ckpts in "$STATE"/*/*/checkpoints; do
  [ -d "$ckpts" ] || continue
  ls -d "$ckpts"/[0-9]* 2>/dev/null | sort -V | head -n -1 | xargs -r rm -rf
done
if [ -n "$(ls -A "$STATE")" ]; then
  tar -C "$STATE" -czf "$OUTDIR/devruns.tar.gz" .
fi
for f in "$W"/*.log; do
  echo "== $(basename "$f")"
  tail -n 25 "$f"
done
cat "$W/gpu.txt"
