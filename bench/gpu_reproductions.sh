#!/usr/bin/env bash
# The shipped-model reproductions that are too slow for 2 CPU cores, run side by side on one GPU:
#   restart   issue 5: FID vs NFE for Heun / EDM SDE / DDPM / Restart      (bench/restart_fid_vs_nfe.py)
#   guided    issue 6: DDIM / PLMS / LTSP / STSP, scales 1-10, 5-50 steps (bench/guided_splitting.py)
#   dsno      issue 8: DSNO and KD operators vs teacher and DDIM          (bench/dsno.py)
#   ddss      issue 9: DDSS at K = 5 / 10 / 20, FID on held-out features (train.py + evaluate.py)
#
#   bash bench/gpu_reproductions.sh OUT_DIR [quick]
#
# Each job writes <OUT_DIR>/<job>/ and <OUT_DIR>/<job>.log; a job that fails or runs past JOB_SECONDS
# (default 600) leaves the others running. Measured on one H100, all jobs side by side: restart curves
# 60-140 s, guided 135 s, dsno 300 s, ddss ~570 s (three trainings, 94 / 93 / 191 s, then the FID rows). `quick` shrinks every job to a pipeline check (not a result).
# Needs the Fashion-MNIST files under $FASTSAMPLE_DATA/fashion-mnist (DDSS trains on real images) and
# uses the reference statistics cached in $FASTSAMPLE_CACHE (made on first use otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/gpu_reproductions.sh OUT_DIR [quick]}
QUICK=${2:-}
JOB_SECONDS=${JOB_SECONDS:-600}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu runs the same jobs on the CPU (quick mode: a local check)
ACCELERATOR=$([ "$DEVICE" = cpu ] && echo cpu || echo gpu)
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1

if [ -n "$QUICK" ]; then
  RESTART=(--samples 64 --nfe 21,51 --churn 10 --restart-k 1,4)
  GUIDED=(--steps 5 --num-samples 64 --ref-steps 50 --ref-samples 16 --quality-steps 20)
  DSNO=(--quick --samples 64)
  DDSS_TRAIN=(trainer.max_steps=4 trainer.val_check_interval=2 task.eval_samples=64 dataset.subset=512)
  DDSS_SEEDS=0-255
  DDSS_K="5"
else
  RESTART=(--samples 1000 --churn 10,40)
  GUIDED=(--num-samples 500)
  DSNO=(--samples 2000 dataset.count=20000 dataset.batch_size=32 trainer.max_steps=3000)
  DDSS_TRAIN=()
  DDSS_SEEDS=0-4999
  DDSS_K="5 10 20"
fi

run_job() {  # name, command...: runs in the background with its own time limit and log
  local name=$1
  shift
  (
    start=$(date +%s)
    timeout "$JOB_SECONDS" "$@" >"$OUT/$name.log" 2>&1
    echo "[$name] exit $? after $(($(date +%s) - start)) s" | tee -a "$OUT/$name.log"
  ) &
}

ddss_job() {  # DDSS trainings, then FID rows on held-out features (one multirun per sampler family)
  local k
  for k in $DDSS_K; do
    $PY train.py experiment=ddss_fmnist_k$k trainer.accelerator=$ACCELERATOR "paths.output_dir=$OUT/ddss/k$k" \
      "${DDSS_TRAIN[@]}" || return
  done
  local steps=${DDSS_K// /,} paths=()
  for k in $DDSS_K; do paths+=("$OUT/ddss/k$k/ggdm.pt"); done
  local eval_args=(mode=generate model=unet_fmnist class_labels=cycle "seeds=$DDSS_SEEDS" split=test
    device=$DEVICE batch_size=1000 progress=false features=module features.label=random_conv0
    features.module._target_=fastsample.metrics.feature_loss.RandomConvFeatures)
  $PY evaluate.py -m "${eval_args[@]}" "hydra.sweep.dir=$OUT/ddss/eval-ddim" sampler=ddim \
    "sampler.steps=$steps" sampler.schedule.kind=time_uniform,quadratic || return
  $PY evaluate.py -m "${eval_args[@]}" "hydra.sweep.dir=$OUT/ddss/eval-dpmpp_2m" sampler=dpmpp_2m \
    "sampler.steps=$steps" || return
  $PY evaluate.py -m "${eval_args[@]}" "hydra.sweep.dir=$OUT/ddss/eval-ggdm" sampler=ggdm \
    "sampler.path=$(IFS=,; echo "${paths[*]}")"
}

if [ "${3:-}" = ddss ]; then  # the DDSS job, run by the line below under its own time limit
  ddss_job
  exit
fi

# fail fast (seconds, not a whole time limit) when the environment is not ready
$PY -c "import hydra, omegaconf, torch, fastsample.jobs.benchmark, fastsample.jobs.training
assert '$DEVICE' == 'cpu' or torch.cuda.is_available(), 'no CUDA device'" || exit 3
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "$DEVICE"; } | tee "$OUT/device.txt"
# one process per curve / scale group: rows print as they finish, so a job cut by its time limit still
# reports what it measured, and the latency-bound jobs (small batches) overlap the bandwidth-bound ones
for family in heun edm_sde ddpm restart; do
  run_job restart-$family $PY bench/restart_fid_vs_nfe.py --device $DEVICE --batch-size 1000 \
    --samplers $family --out "$OUT/restart-$family" "${RESTART[@]}" progress=false
done
for scales in 10,5 2,1; do
  run_job guided-${scales/,/-} $PY bench/guided_splitting.py --device $DEVICE --batch-size 1000 \
    --scales $scales --out "$OUT/guided-${scales/,/-}" "${GUIDED[@]}"
done
run_job dsno $PY bench/dsno.py --device $DEVICE --batch-size 1000 --out "$OUT/dsno" "${DSNO[@]}"
run_job ddss bash "$0" "$OUT" "$QUICK" ddss
wait
grep -h "^\[.*\] exit" "$OUT"/*.log
