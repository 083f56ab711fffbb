#!/usr/bin/env bash
# One GPU validation run of SIFT-Train: at most 8 minutes on one H100/H200, every result under $OUT.
#
#   OUT=/path/to/out bash benchmarks/gpu/gpu_validate.sh      # on the GPU machine, from a copy of the project
#   GPU_VALIDATE_DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu/gpu_validate.sh   # print each stage's command only
#   GPU_VALIDATE_PART=2 OUT=/path/to/out2 bash benchmarks/gpu/gpu_validate.sh   # the follow-up (about 4 minutes)
#
# Part 1 (the default) is the validation below. Part 2 is for the device time a session has left after it
# (a session gets 15 minutes, start-up included): torch.compile per block against eager, and
# train.nonfinite=skip against stop, each pair in one call so that the two are comparable.
#
# The GPU image lacks deepspeed, hjson and py-cpuinfo: carry the wheels that benchmarks/gpu/gpu_wheels.sh puts
# in .whl/ (built on a machine with network); they are installed into $WORK/site, never into the image.
# Stages run in order, each under its own time limit, and a failing stage does not stop the next; the
# whole run stops starting stages when BUDGET_S is spent. $OUT gets: meta.txt, progress.txt, rc.txt
# (stage, exit code, limit, seconds), one log per stage, env.json, pytest-gpu.xml, sync-audit.json,
# bench/*.json|md (T=512 and T=128), train/<run>/metrics.jsonl, profile/ (torch.profiler traces),
# summary.md (printed last). benchmarks/README.md describes each stage and what it checks.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

OUT=${OUT:-$PWD/gpu-out}
WORK=${GPU_VALIDATE_WORK:-/tmp/sift-gpu-validate}  # scratch: wheels, prepared data, training runs
PY=${PY:-python3}
DRY=${GPU_VALIDATE_DRY_RUN:-0}
PART=${GPU_VALIDATE_PART:-1}
BUDGET_S=470   # the device call allows 8 minutes; this is the whole run (install and summary included)
SUMMARY_S=15   # kept back for the summary
INSTALL_S=30   # the wheels' install
T0=$(date +%s)

mkdir -p "$OUT"
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(el)s] $*" | tee -a "$OUT/progress.txt"; }
cap() {  # cap LIMIT -> LIMIT or what is left of the budget, whichever is smaller
  local left=$(( BUDGET_S - SUMMARY_S - $(el) )); echo $(( $1 < left ? $1 : left )); }
print_stage() { printf 'STAGE %s %s ::' "$1" "$2"; shift 2; printf ' %q' "$@"; echo; }

stage() {  # stage NAME LIMIT_S CMD...  -> $OUT/NAME.log; "NAME rc limit seconds" appended to $OUT/rc.txt
  local name=$1 lim; lim=$(cap "$2"); shift 2
  if [[ $DRY == 1 ]]; then print_stage "$name" "$lim" "$@"; return 0; fi
  if (( lim < 5 )); then log "skip $name: budget spent"; echo "$name skipped 0 0" >> "$OUT/rc.txt"; return 0; fi
  log "start $name (limit ${lim}s)"
  local t; t=$(el)
  timeout -k 5 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $lim $(( $(el) - t ))" >> "$OUT/rc.txt"
  log "end $name rc=$rc"
}

stage_killed_after_checkpoint() {  # NAME LIMIT_S RUN_DIR CMD...: CMD, SIGKILLed once RUN_DIR has a checkpoint
  # A crash right after a checkpoint, with no help from the program: poll for checkpoints/latest (written
  # last, after the checkpoint is complete), then kill the run's whole process group (loader workers too).
  local name=$1 lim dir=$3; lim=$(cap "$2"); shift 3
  if [[ $DRY == 1 ]]; then print_stage "$name" "$lim" "$@"; return 0; fi
  if (( lim < 5 )); then log "skip $name: budget spent"; echo "$name skipped 0 0" >> "$OUT/rc.txt"; return 0; fi
  log "start $name (limit ${lim}s, killed after its first checkpoint)"
  local t rc outcome=finished-before-the-kill; t=$(el)
  set -m  # job control: the run gets its own process group
  "$@" > "$OUT/$name.log" 2>&1 &
  local pid=$!
  set +m
  while kill -0 "$pid" 2> /dev/null; do
    if [[ -s $dir/checkpoints/latest ]]; then outcome=killed; kill -KILL -- "-$pid" 2> /dev/null; break; fi
    if (( $(el) - t >= lim )); then outcome=timeout; kill -KILL -- "-$pid" 2> /dev/null; break; fi
    sleep 0.2
  done
  wait "$pid" 2> /dev/null; rc=$?
  [[ $outcome == killed ]] && rc=killed
  echo "$name $rc $lim $(( $(el) - t ))" >> "$OUT/rc.txt"
  log "end $name: $outcome (rc=$rc)"
}

# --- 0. what runs where; the missing packages from the carried wheels --------------------------------------
export PYTHONPATH=$PWD:$WORK/site TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCH_NCCL_HIGH_PRIORITY=1  # collectives on high-priority streams, level with the training stream
unset DS_ACCELERATOR RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
if [[ $DRY != 1 ]]; then
  rm -rf "$WORK" && mkdir -p "$WORK"
  { echo "date: $(date -u +%FT%TZ)"; echo "commit: ${GIT_COMMIT:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}"
    echo "command: GPU_VALIDATE_PART=$PART OUT=$OUT bash benchmarks/gpu/gpu_validate.sh"; } > "$OUT/meta.txt"
  if ! "$PY" -c "import deepspeed, hjson, cpuinfo" 2> /dev/null; then
    if compgen -G ".whl/*.whl" > /dev/null; then
      log "installing $(ls .whl | wc -l) wheels into $WORK/site"
      timeout "$INSTALL_S" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl \
        > "$OUT/pip.log" 2>&1 || log "wheel install failed (see pip.log)"
    else
      log "deepspeed is not importable and there is no .whl/ (run benchmarks/gpu/gpu_wheels.sh, carry .whl)"
    fi
  fi
fi

if [[ $PART == 2 ]]; then
# --- follow-up: compile and the non-finite check, at T=512 (vanilla and SIFT exit-1 loss, pipelined) ------
stage env 10 "$PY" -m benchmarks.gpu.gpu_report env --out "$OUT/env.json"
stage bench-T512-compile 150 "$PY" -m benchmarks.throughput --preset gpu-base --seq-lens 512 --exits 1 \
  --criteria loss --variants vanilla,pipelined --compile both --steps 20 --warmup 8 --out "$OUT/bench" \
  --name throughput-gpu-base-T512-compile --no-chart
stage bench-T512-nonfinite-skip 30 "$PY" -m benchmarks.throughput --preset gpu-base --seq-lens 512 --exits 1 \
  --criteria loss --variants vanilla,pipelined --steps 20 --warmup 8 --out "$OUT/bench" \
  --name throughput-gpu-base-T512-nonfinite-skip --no-chart train.nonfinite=skip
stage bench-T512-nonfinite-stop 30 "$PY" -m benchmarks.throughput --preset gpu-base --seq-lens 512 --exits 1 \
  --criteria loss --variants vanilla,pipelined --steps 20 --warmup 8 --out "$OUT/bench" \
  --name throughput-gpu-base-T512-nonfinite-stop --no-chart train.nonfinite=stop
else
# --- 1. environment: versions, GPU, SDPA backends, stream priorities, what BertLayer returns ----------------
stage env 20 "$PY" -m benchmarks.gpu.gpu_report env --out "$OUT/env.json"

# --- 2. the GPU tests: side-stream scores, one-step staleness (also on the training stream), peak memory ----
stage pytest-gpu 80 "$PY" -m pytest -q -m gpu tests/gpu -rA -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml"

# --- 3. host syncs of steady-state vanilla and pipelined micro-steps (BERT-base, T=512, ZeRO-1 bf16), with
#        train.nonfinite=stop (the default, skip, adds one read of a finiteness flag per micro-step) ----------
stage sync-audit 40 "$PY" -m benchmarks.probes.sync_audit --preset gpu-base --seq-len 512 --variants vanilla,pipelined \
  --warmup 4 --steps 3 --out "$OUT/sync-audit.json" train.nonfinite=stop

# --- 4. throughput: vanilla, SIFT exit 1 serial and pipelined, loss and entropy, at T=512 and T=128 ---------
stage bench-T512 70 "$PY" -m benchmarks.throughput --preset gpu-base --seq-lens 512 --exits 1 --criteria loss,entropy \
  --steps 30 --warmup 8 --out "$OUT/bench" --name throughput-gpu-base-T512 --no-chart
stage bench-T128 40 "$PY" -m benchmarks.throughput --preset gpu-base --seq-lens 128 --exits 1 --criteria loss,entropy \
  --steps 30 --warmup 8 --out "$OUT/bench" --name throughput-gpu-base-T128 --no-chart

# --- 5. short bf16 pipelined training (4 BERT-base layers, T=128): ZeRO-2 killed after a checkpoint and
#        resumed, then ZeRO-3 ------------------------------------------------------------------------------
stage corpus 10 "$PY" -m benchmarks.gpu.gpu_report corpus "$WORK/corpus" --docs 800
stage prepare 20 "$PY" -m launcher.cli prepare "$WORK/corpus/demo-corpus.jsonl" --out "$WORK/data" --seq-len 128 \
  --tokenizer tests/assets/tokenizer-512 --val-fraction 0.05 --seed 0 --num-proc 4 --log-level WARNING
TRAIN=("$PY" -m launcher.cli train --config tests/assets/tiny-run.yaml "data.path=$WORK/data" data.num_workers=2
  model.preset=base model.num_layers=4 model.hidden_size=768 model.num_heads=12 model.intermediate_size=3072
  train.micro_batch_size=32 sift.keep=0.5 sift.schedule=pipelined sift.criterion=loss sift.warmup_steps=4
  sift.fidelity_every=10 train.log_every=5 train.eval_every=50 train.eval_samples=64 train.eval_batch_size=32
  train.save_every=20 optim.lr=3e-4 deepspeed.precision=bf16)
stage_killed_after_checkpoint train-z2-killed 30 "$WORK/z2" "${TRAIN[@]}" deepspeed.config=ds_configs/zero2.json \
  train.steps=100 "train.out_dir=$WORK/z2"
stage train-z2-resumed 30 "${TRAIN[@]}" deepspeed.config=ds_configs/zero2.json train.steps=100 "train.out_dir=$WORK/z2"
stage train-z3 30 "${TRAIN[@]}" deepspeed.config=ds_configs/zero3.json train.steps=40 "train.out_dir=$WORK/z3"
if [[ $DRY != 1 ]]; then
  for run in z2 z3; do
    mkdir -p "$OUT/train/$run" && cp "$WORK/$run"/metrics.jsonl "$WORK/$run"/summary.json "$OUT/train/$run/" 2> /dev/null
  done
fi

# --- 6. torch.profiler traces and top-operator tables of vanilla and pipelined (T=512) ----------------------
stage profile-T512 30 "$PY" -m benchmarks.throughput --preset gpu-base --seq-lens 512 --exits 1 --criteria loss \
  --variants vanilla,pipelined --steps 10 --warmup 5 --profile-dir "$OUT/profile" --profile-steps 2 \
  --out "$OUT/profile" --name profile-T512 --no-chart

# --- 7. what the DeepSpeed settings of issue 11 changed: the same T=512 steps with the settings before it ----
stage bench-T512-ds-before 30 "$PY" -m benchmarks.throughput --preset gpu-base --seq-lens 512 --exits 1 \
  --criteria loss --variants vanilla,pipelined --steps 20 --warmup 5 --out "$OUT/bench" \
  --name throughput-gpu-base-T512-ds-before --no-chart deepspeed.config=benchmarks/gpu/zero1-before-issue11.json
fi

# --- summary, printed last --------------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  print_stage summary "$SUMMARY_S" "$PY" -m benchmarks.gpu.gpu_report summary "$OUT"
  exit 0
fi
timeout "$SUMMARY_S" "$PY" -m benchmarks.gpu.gpu_report summary "$OUT" > "$OUT/summary.md" 2>&1
log "done"
cat "$OUT/summary.md"
