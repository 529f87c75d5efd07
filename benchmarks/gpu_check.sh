#!/usr/bin/env bash
# The one prepared GPU script: every GPU test and benchmark in a few minutes, a short table last.
#
#   bash benchmarks/gpu_check.sh            (OUT=folder for results; default ./results)
#
# A bare GPU machine without a package index: `simmim` is made importable by mapping the repo's
# folders (no pip needed). Wheels (DALI and its dependencies, prepared by benchmarks/gpu_wheels.sh
# and copied batch by batch into $WHEEL_PARTS, default /tmp/wheelparts) are installed to /tmp/site;
# a wheel split into NAME.whl.part-aa, -ab, ... is joined first. Without them, the DALI rows are
# left out of the loader benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"

PARTS=${WHEEL_PARTS:-/tmp/wheelparts}
mkdir -p /tmp/joined
for first in "$PARTS"/*.whl.part-aa; do
  [ -e "$first" ] || continue
  wheel=$(basename "${first%.part-aa}")
  cat "${first%aa}"* > "/tmp/joined/$wheel" && echo "joined $wheel" | tee -a "$LOG"
done
if ls "$PARTS"/*.whl /tmp/joined/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $(ls "$PARTS"/*.whl /tmp/joined/*.whl 2>/dev/null) >>"$LOG" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import simmim.kernels" 2>/dev/null; then
  mkdir -p /tmp/simmim_path/simmim
  for p in pipeline kernels trainer benchmarks; do ln -sfn "$PWD/$p" "/tmp/simmim_path/simmim/$p"; done
  export PYTHONPATH=/tmp/simmim_path${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$LOG"

declare -A STATUS
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$LOG"
  local t0=$SECONDS
  if timeout "$limit" "$@" >>"$LOG" 2>&1; then STATUS[$name]="ok ($((SECONDS - t0)) s)"
  else STATUS[$name]="FAILED rc=$? ($((SECONDS - t0)) s), see $LOG"; fi
  tail -n 3 "$LOG"
}

step "gpu tests: kernels" 300 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py
step "bench kernels" 240 $PY -m simmim.trainer.cli bench kernels --out "$RESULTS"
step "bench step bf16" 240 $PY -m simmim.trainer.cli bench step --out "$RESULTS"
step "bench step shuffle" 240 $PY -m simmim.trainer.cli bench step --no-fused-shuffle --out "$RESULTS"
step "bench claims" 240 $PY -m simmim.trainer.cli bench claims --out "$RESULTS"
step "bench memory" 300 $PY -m simmim.trainer.cli bench memory --out "$RESULTS"  # activations under CUDA autocast
# GPU decoding: DALI mixed (with and without the hardware JPEG decoder) and CPU, beside the
# reference loader, on ImageNet-sized synthetic JPEGs (and the sample set when it can be built)
step "bench loaders synthetic" 300 $PY -m simmim.trainer.cli bench loaders --synthetic 4000 --size 192 \
  --batch 128 --workers 16 --epochs 3 --out "$RESULTS"
if $PY -c "import skimage" 2>/dev/null; then
  step "bench loaders sample" 180 $PY -m simmim.trainer.cli bench loaders --size 192 --batch 64 --workers 16 --out "$RESULTS"
fi

echo
echo "================ summary ($(date -u +%H:%M:%S) UTC)"
for k in "${!STATUS[@]}"; do printf '%-22s %s\n' "$k" "${STATUS[$k]}"; done
$PY - "$RESULTS" <<'PY'
import glob, json, sys
for path in glob.glob(f"{sys.argv[1]}/kernels-*/kernels.json"):
    r = json.load(open(path))
    print(f"\nkernels on {r['device']}, batch {r['batch']}, copy bandwidth {r['copy_gb_s'] or 0:.0f} GB/s")
    print(f"{'shape':<11} {'op':<10} {'fused ms':>9} {'eager ms':>9} {'compiled':>9} {'vs eager':>9} {'vs comp.':>9} {'% copy bw':>9}")
    for shape in dict.fromkeys(t["shape"] for t in r["timings"]):
        for op in ("mask_fill", "masked_l1", "l1_head"):
            t = {x["impl"]: x for x in r["timings"] if x["shape"] == shape and x["op"] == op}
            f, e, c = t["fused"], t["eager ref"], t["compiled ref"]
            print(f"{shape:<11} {op:<10} {f['ms']:>9.3f} {e['ms']:>9.3f} {c['ms']:>9.3f} {e['ms'] / f['ms']:>8.2f}x "
                  f"{c['ms'] / f['ms']:>8.2f}x {100 * f['gb_s'] / r['copy_gb_s']:>8.0f}%")
for path in glob.glob(f"{sys.argv[1]}/claims-*/claims.json"):
    r = json.load(open(path))
    print(f"\nclaims on {r['device']} (total cost x SimMIM by time; paper's claim)")
    for x in r["rows"]:
        if x["claimed"]:
            print(f"{x['method']:<8} {x.get('cost_vs_simmim_time') or float('nan'):5.2f}x  claim {x['claimed']:.1f}x")
for path in glob.glob(f"{sys.argv[1]}/loaders-*/loaders*.json"):
    r = json.load(open(path))
    print(f"\nloaders on {r['device']}: {r['images']} {r['source']} images, {r['size']} px, {r['workers']} workers")
    base = next((x["img_per_s"] for x in r["rows"] if x["loader"] == "torch"), None)
    for x in r["rows"]:
        ratio = f"{x['img_per_s'] / base:6.2f}x" if base else ""
        print(f"{x['loader']:<14} {x['img_per_s']:8.0f} img/s {ratio}  steady {x.get('steady_img_per_s') or 0:8.0f} img/s"
              f"  epoch start {x.get('epoch_start_s', 0):.2f} s")
for path in glob.glob(f"{sys.argv[1]}/step-*/step-*.json"):
    r = json.load(open(path))
    print(f"\ntraining step on {r['device']} ({path.rsplit('/', 1)[1][5:-5]})")
    for x in r["rows"]:
        mfu = f"{x['mfu_pct']:.1f}%" if x["mfu_pct"] is not None else "n/a"
        print(f"{x['model']:<10} {x['image_size']} batch {x['batch']}{'' if x['fused_shuffle'] else ' PixelShuffle'}: "
              f"{x['img_per_s']:8.0f} img/s  MFU {mfu:>6}  "
              f"data wait {x['data_wait_pct']:.1f}%  peak {x['peak_mem_gib'] or 0:.1f} GiB")
PY
