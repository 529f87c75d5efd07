#!/usr/bin/env bash
# The one prepared GPU script: the GPU tests and benchmarks within one time budget, a summary last.
#
#   bash benchmarks/gpu_check.sh                          part 1: kernel tests, kernels, bf16 step and
#                                                         MFU (eager), data wait, claims, loaders, the step
#                                                         with PixelShuffle, memory (DDP vs FSDP2); last the
#                                                         compiled step (ViT-B, then Swin-B: they take what is left)
#   GPU_CHECK_PART=dali bash benchmarks/gpu_check.sh      part 2, a second call: DALI's wheels (sent by
#                                                         benchmarks/gpu_wheels.sh) checked and installed,
#                                                         DALI loaders and the data wait with DALI
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh      every step on the CPU at tiny sizes, through the
#                                                         same commands (tests/test_gpu_check.py runs it)
#
# Made for a lent GPU machine (one call of at most 600 s, at most 8 files back from $OUT, no package
# index). It writes exactly two files into $OUT (default results/gpu_check):
#   gpu_check[-dali].log     everything, line by line as it happens (complete even if a step hangs);
#                            line 1: versions, GPU, /dev/shm size, CPU count; the summary table last
#   gpu_check[-dali].tar.gz  every result file (results/<bench>-<device>/*.json, .md, .png, the pytest
#                            JUnit XML, steps.tsv, summary.txt), rewritten after every step
# Budget: one overall budget (GPU_CHECK_BUDGET, default 480 s); each step may use what is left (less
# GPU_CHECK_RESERVE for the summary), at most its own cap on the GPU, and is SKIPPED when less than
# GPU_CHECK_MIN_STEP seconds are left. The caps add up to the budget less the reserve; the cheap
# steps come first, the compiled steps last (the last takes all that is left), so a slow compilation
# can cost only its own figures. A step past its limit is stopped with everything it started (its
# process group: TERM, then KILL 5 s later); so is anything a finished step left running. The status
# tells a stop at the limit from a kill by a signal before it (SIGKILL: likely the kernel's OOM
# killer; SIGBUS: likely a full /dev/shm). The benchmarks rewrite their JSON after every model, op or
# method, so a stopped step still leaves what it finished in the archive.
# Loader workers: as many as /dev/shm holds (each keeps 4 batches there; a 2x margin), at most one
# per CPU; 0 (loading in the main process) when not even one fits. The log names the choice.
# Other settings: PYTHON (default python3), WHEEL_PARTS (default /tmp/wheelparts), GPU_CHECK_INJECT
# (a shell command run as an extra first step: how the tests make a step hang).
# The dry run hides any GPU, runs the Triton kernels in the interpreter, sets TORCH_COMPILE_DISABLE=1
# (inductor on a CPU takes minutes; compilation itself is checked by the pytest step on the GPU) and
# times the claims' methods (SimMIM) but not the four Swin-B heads. Its budget (default 300 s) is
# counted in CPU seconds the steps used (user + system, from /proc), not wall seconds: what the
# machine delivered, so other work sharing the CPUs slows the dry run without using up its budget
# (one thread per step: the tiny sizes gain nothing from more). A step that hangs uses no CPU, so
# each step's wall limit is what is left of the budget times GPU_CHECK_DRY_SLACK (default 6), and the
# whole run stops after BUDGET x SLACK wall seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
PART=${GPU_CHECK_PART:-main}
DRY=${GPU_CHECK_DRY_RUN:-0}
PY=${PYTHON:-python3}
case "$PART" in main) SUFFIX= ;; dali) SUFFIX=-dali ;;
  *) echo "gpu_check.sh: GPU_CHECK_PART must be main or dali, got '$PART'" >&2; exit 2 ;; esac
case "$DRY" in 0|1) ;; *) echo "gpu_check.sh: GPU_CHECK_DRY_RUN must be 0 or 1, got '$DRY'" >&2; exit 2 ;; esac
if ((DRY)); then D_BUDGET=300 D_MIN=1 D_RESERVE=3; else D_BUDGET=480 D_MIN=20 D_RESERVE=10; fi
BUDGET=${GPU_CHECK_BUDGET:-$D_BUDGET}
MIN_STEP=${GPU_CHECK_MIN_STEP:-$D_MIN}
RESERVE=${GPU_CHECK_RESERVE:-$D_RESERVE}
SLACK=${GPU_CHECK_DRY_SLACK:-6}
for v in BUDGET MIN_STEP RESERVE SLACK; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: GPU_CHECK_${v/SLACK/DRY_SLACK} must be a whole number, got '${!v}'" >&2; exit 2; }
done
OUTDIR=${OUT:-results/gpu_check}
mkdir -p "$OUTDIR" || exit 2
LOG=$OUTDIR/gpu_check$SUFFIX.log
ARCHIVE=$OUTDIR/gpu_check$SUFFIX.tar.gz
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
RES=$WORK/results
mkdir -p "$RES" "$WORK/path/simmim"
: >"$RES/steps.tsv"
: >"$LOG"

# simmim from this checkout, without pip: its folders mapped into a namespace package
for p in core kernels pipeline trainer benchmarks cli; do ln -sfn "$PWD/$p" "$WORK/path/simmim/$p"; done
export PYTHONPATH=$WORK/path${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SIMMIM=("$PY" -m simmim.cli)  # the `simmim` console script: every command, bench included

# Sizes: the paper's on the GPU; tiny on the CPU (the same commands and flags)
if ((DRY)); then
  export CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 TORCH_COMPILE_DISABLE=1 OMP_NUM_THREADS=1
  PYTEST_K="dispatch or deterministic" KBATCH=2 MODELS=vit_micro LMODEL=vit_micro BATCH=2 STEPS=1 WARMUP=1
  VIT=vit_micro SWIN=swin_mini JPEGS=8 MAX_WORKERS=1 LSIZE=64 LBATCH=4 LEPOCHS=1 LROUNDS=1 LJPEGS=8 LOADERS=torch
  CBATCH=1 CSTEPS=1
  CMETHODS=SimMIM
  CHEADS=--no-head-timing  # three Swin-B models: minutes on a shared 2-core CPU
  MEMMODELS=swin_base
  SITE=$WORK/site
else
  export TRITON_INTERPRET=0
  PYTEST_K="" KBATCH=128 MODELS=swin_base,vit_base LMODEL=swin_base BATCH=128 STEPS=20 WARMUP=5
  # bench loaders: ours and the plain pipelines beside them (torchvision, released SimMIM, FFCV, DALI),
  # 3 interleaved rounds of one epoch each on 2000 JPEGs
  VIT=vit_base SWIN=swin_base JPEGS=4000 MAX_WORKERS=$(nproc) LSIZE=192 LBATCH=128 LEPOCHS=1 LROUNDS=3 LJPEGS=2000
  LOADERS=torch,ffcv
  CBATCH=64 CSTEPS=10
  CMETHODS="SimMIM,MAE,BEiT,DINO,MoCo v3,ViT-MPP,DeiT-B" CHEADS=
  MEMMODELS=swin_base,swin_large,swinv2_base,swinv2_large,swinv2_huge,swinv2_giant
  SITE=/tmp/site
fi
export WHEEL_PARTS=${WHEEL_PARTS:-/tmp/wheelparts} SITE

say() { echo "$*" | tee -a "$LOG"; }

archive() {  # every result so far, replaced atomically
  tar -czf "$ARCHIVE.part" -C "$WORK" results 2>>"$LOG" && mv -f "$ARCHIVE.part" "$ARCHIVE"
}

declare -A STATUS
record() {  # record NAME STATUS SECONDS NOTE
  STATUS[$1]=$2
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RES/steps.tsv"
  say "-- $1: $2 ($3 s)${4:+ $4}"
  archive
}

STOP=
CURRENT=
trap 'STOP="interrupted"; [ -n "$CURRENT" ] && kill -TERM -- "-$CURRENT" 2>/dev/null' TERM INT

spent() {  # seconds of the budget used: wall seconds on the GPU; in the dry run the CPU seconds of the
  # finished steps (this shell's reaped children: /proc's cutime + cstime, in clock ticks)
  if ((DRY)); then
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print int(($14 + $15) / hz) }' "/proc/$$/stat"
  else echo $((SECONDS - T0)); fi
}

step() {  # step NAME CAP_S [--needs STEP] COMMAND...   (CAP_S: the step's own limit on the GPU; rest: all that is left)
  local name=$1 cap=$2 needs= note= rc; shift 2
  if [ "${1:-}" = --needs ]; then needs=$2; shift 2; fi
  local left=$((BUDGET - $(spent) - RESERVE))
  if ((DRY)) || [ "$cap" = rest ]; then cap=$left; fi
  local limit=$((cap < left ? cap : left))
  if ((DRY)); then  # in wall seconds: what is left of the CPU budget, with the slack, within the whole run's
    local wall_left=$((BUDGET * SLACK - (SECONDS - T0) - RESERVE))
    limit=$((limit * SLACK < wall_left ? limit * SLACK : wall_left))
  fi
  if [ -n "$STOP" ]; then record "$name" SKIPPED 0 "$STOP"; return; fi
  if [ -n "$needs" ] && [ "${STATUS[$needs]:-}" != OK ]; then record "$name" SKIPPED 0 "needs '$needs'"; return; fi
  if ((limit < MIN_STEP)); then record "$name" SKIPPED 0 "${left} s of the budget left, under ${MIN_STEP} s"; return; fi
  say "== $name (limit ${limit} s): $*"
  local t1=$SECONDS from=$(($(stat -c %s "$LOG") + 1))
  # timeout leads a process group of its own: on expiry TERM, 5 s later KILL, to the whole group;
  # -v writes "timeout: sending signal ..." into the log when (and only when) it fires
  timeout -v -k 5 "$limit" "$@" >>"$LOG" 2>&1 </dev/null &
  CURRENT=$!
  wait "$CURRENT"; rc=$?
  while kill -0 "$CURRENT" 2>/dev/null; do wait "$CURRENT"; rc=$?; done  # a trapped signal ends wait early
  kill -KILL -- "-$CURRENT" 2>/dev/null  # whatever the step left running
  CURRENT=
  local took=$((SECONDS - t1))
  if ((rc == 0)); then record "$name" OK "$took" ""
  elif ((rc == 124 || took >= limit)) || tail -c +"$from" "$LOG" | grep -q '^timeout: sending signal'; then
    ((rc == 137)) && note=": TERM ignored, then KILL"
    record "$name" FAILED "$took" "stopped at its ${limit} s limit (rc $rc$note)"
  elif ((rc > 128)); then
    local sig
    sig=$(kill -l $((rc - 128)) 2>/dev/null || echo "signal $((rc - 128))")
    case "$sig" in
      KILL) note="; not the time limit: likely the kernel's OOM killer (host memory), see dmesg" ;;
      BUS) note="; likely a full /dev/shm (loader workers' shared memory)" ;;
      *) note= ;;
    esac
    record "$name" FAILED "$took" "killed by SIG$sig (rc $rc) after $took s, before its ${limit} s limit$note"
  else record "$name" FAILED "$took" "rc $rc, see the log above"; fi
}

loader_workers() {  # loader_workers MAX BATCH_BYTES: as many workers as /dev/shm holds, at most MAX
  local max=$1 batch_bytes=$2 shm per fit
  shm=$(df -B1 --output=size /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')
  [[ $shm =~ ^[0-9]+$ ]] || shm=0
  per=$((4 * batch_bytes * 2))  # the reference loader's prefetch_factor=4 batches per worker, a 2x margin
  fit=$((shm / per))
  WORKERS=$((fit < max ? fit : max))
  say "loader workers: $WORKERS (CPUs $max; /dev/shm $((shm >> 20)) MiB holds $fit workers of 4 float32 batches of" \
    "$((batch_bytes >> 20)) MiB with a 2x margin)$( ((WORKERS == 0)) && echo ': loading in the main process')"
}

versions() {  # the log's first line
  "$PY" - "$PART" "$DRY" "$BUDGET" <<'PY' 2>&1 || echo "gpu_check part=$PART dry_run=$DRY: versions unreadable ($PY)"
import importlib.metadata as md, os, platform, shutil, subprocess, sys
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
dali = next((f"{d.metadata['Name']} {d.version}" for d in md.distributions()
             if (d.metadata["Name"] or "").lower().startswith("nvidia-dali")), None)
pkgs = [f"{n} {v(n) or 'missing'}" for n in ("torch", "triton", "timm", "numpy")] + ([dali] if dali else ["dali none"])
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip().replace("\n", "; ") or "none"
except (OSError, subprocess.TimeoutExpired):
    gpu = "none (no nvidia-smi)"
if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
    gpu += " [hidden: dry run]"
shm = shutil.disk_usage("/dev/shm").total / 2**30 if os.path.exists("/dev/shm") else 0
part, dry, budget = sys.argv[1:4]
print(f"gpu_check part={part} dry_run={dry} budget={budget}s | python {platform.python_version()} | "
      + ", ".join(pkgs) + f" | GPU: {gpu} | /dev/shm {shm:.1f} GiB | CPUs {os.cpu_count()} "
      f"(usable {len(os.sched_getaffinity(0))})")
PY
}

if [ -n "${GPU_CHECK_INJECT:-}" ]; then INJECT=(step "injected" 60 bash -c "$GPU_CHECK_INJECT"); else INJECT=(true); fi

# a loader's batch in /dev/shm: (B, 3, S, S) float32 images, B the larger of the two loader steps'
# batches (on the GPU both read 192 px: the loaders' size and Swin-B's)
BATCH_BYTES=$(( (BATCH > LBATCH ? BATCH : LBATCH) * 3 * LSIZE * LSIZE * 4 ))

if [ "$PART" = main ]; then
  versions | tee -a "$LOG"
  loader_workers "$MAX_WORKERS" "$BATCH_BYTES"
  "${INJECT[@]}"
  # caps: 35+65+40+45+55+50+35+30+65 = 420 s; the last step takes the rest (~50 s of a 480 s budget)
  step "tests: kernels" 35 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_kernels_triton.py \
    tests/test_rand_augment.py::test_batched_on_the_gpu_matches_the_cpu -k "$PYTEST_K" \
    --junitxml="$RES/pytest-kernels.xml"
  step "bench kernels" 65 "${SIMMIM[@]}" bench kernels --batch "$KBATCH" --out "$RES"
  step "bench step bf16" 40 "${SIMMIM[@]}" bench step --models "$MODELS" --batch "$BATCH" --steps "$STEPS" \
    --warmup "$WARMUP" --precision bf16 --out "$RES"
  step "bench step data wait (torch)" 45 "${SIMMIM[@]}" bench step --models "$LMODEL" --batch "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --precision bf16 --data loader --loader torch --synthetic "$JPEGS" \
    --workers "$WORKERS" --out "$RES"
  step "bench claims" 55 "${SIMMIM[@]}" bench claims --batch "$CBATCH" --steps "$CSTEPS" --methods "$CMETHODS" \
    ${CHEADS:+"$CHEADS"} --out "$RES"
  step "bench loaders" 50 "${SIMMIM[@]}" bench loaders --synthetic "$LJPEGS" --size "$LSIZE" --batch "$LBATCH" \
    --workers "$WORKERS" --epochs "$LEPOCHS" --rounds "$LROUNDS" --backends "$LOADERS" --out "$RES"
  step "bench step PixelShuffle" 35 "${SIMMIM[@]}" bench step --models "$MODELS" --batch "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --precision bf16 --no-fused-shuffle --out "$RES"
  # per-GPU memory, DDP vs FSDP2 over 8 GPUs: activations measured under CUDA bf16 autocast
  step "bench memory" 30 "${SIMMIM[@]}" bench memory --models "$MEMMODELS" --gpus 8 --precision bf16 --out "$RES"
  # compilation (inductor, cold cache) last, one model per step: ViT-B compiles faster than Swin-B
  step "bench step bf16 compiled ViT-B" 65 "${SIMMIM[@]}" bench step --models "$VIT" --batch "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --precision bf16 --compile --tag "$VIT" --out "$RES"
  step "bench step bf16 compiled Swin-B" rest "${SIMMIM[@]}" bench step --models "$SWIN" --batch "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --precision bf16 --compile --tag "$SWIN" --out "$RES"
else
  # the install's output follows the versions line, which must name the DALI it installed
  MAIN_LOG=$LOG LOG=$WORK/install.log
  "${INJECT[@]}"
  step "wheels: verify, join, install" 180 bash benchmarks/gpu_wheels.sh install
  LOG=$MAIN_LOG
  [ -d "$SITE" ] && export PYTHONPATH=$PYTHONPATH:$SITE
  { versions; cat "$WORK/install.log"; } >>"$LOG"
  head -n 1 "$LOG"
  loader_workers "$MAX_WORKERS" "$BATCH_BYTES"
  step "dali: import" 60 "$PY" -c "import nvidia.dali as d; print('nvidia.dali', d.__version__, d.__file__)"
  step "bench loaders (dali)" 180 --needs "dali: import" "${SIMMIM[@]}" bench loaders --synthetic "$LJPEGS" \
    --size "$LSIZE" --batch "$LBATCH" --workers "$WORKERS" --epochs "$LEPOCHS" --rounds "$LROUNDS" \
    --backends torch,dali --out "$RES"
  step "bench step data wait (dali)" 120 --needs "dali: import" "${SIMMIM[@]}" bench step --models "$LMODEL" \
    --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --precision bf16 --data loader --loader dali \
    --synthetic "$JPEGS" --workers "$WORKERS" --out "$RES"
fi

TITLE="gpu_check summary: part $PART$( ((DRY)) && echo ', DRY RUN on the CPU'), $(date -u +%H:%M:%S) UTC,"
if ((DRY)); then TITLE+=" $(spent) CPU s of the ${BUDGET} s budget ($((SECONDS - T0)) s wall)"
else TITLE+=" $((SECONDS - T0)) s of the ${BUDGET} s budget"; fi
echo | tee -a "$LOG"
if ! "$PY" benchmarks/gpu_summary.py "$RES" "$RES/steps.tsv" --title "$TITLE" >"$RES/summary.txt" 2>&1; then
  { echo "================ $TITLE (figures unreadable: gpu_summary.py failed)"; cat "$RES/steps.tsv"; } >>"$RES/summary.txt"
fi
tee -a "$LOG" <"$RES/summary.txt"
archive
rm -rf "$WORK"
[[ " ${STATUS[*]} " != *" FAILED "* ]]
