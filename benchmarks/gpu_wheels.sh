#!/usr/bin/env bash
# DALI for a GPU machine without a package index (Python 3.12 there), in transfer-sized batches.
#
#   bash benchmarks/gpu_wheels.sh [prepare]     here, with an index: the wheels pinned (version and sha256)
#                                               in benchmarks/gpu_wheels.txt, wheels over 60 MiB split into
#                                               NAME.whl.part-aa, -ab, ..., packed into .whl/batch-1, -2, ...
#                                               of at most 60 MiB, each with the manifest SHA256SUMS (every
#                                               part, every wheel, and each split wheel as joined)
#   bash benchmarks/gpu_wheels.sh receive DIR   there, one call per batch while the machine stays warm:
#                                               DIR's files checked against SHA256SUMS, then copied into
#                                               $WHEEL_PARTS (default /tmp/wheelparts)
#   bash benchmarks/gpu_wheels.sh install       there (gpu_check.sh part dali runs it): every file of the
#                                               manifest present and matching, the parts joined and each
#                                               joined wheel checked, then pip install --no-index --no-deps
#                                               --target $SITE (default /tmp/site); nothing is installed
#                                               unless every check passes
#
# Settings: PYTHON (python3), GPU_WHEELS_OUT (.whl), GPU_WHEELS_PART_BYTES (60 MiB), GPU_WHEELS_REQUIREMENTS
# (benchmarks/gpu_wheels.txt), GPU_WHEELS_PYTHON (3.12); pip's own PIP_* variables reach the download.
set -euo pipefail
cd "$(dirname "$0")/.."
CMD=${1:-prepare}
PY=${PYTHON:-python3}
PARTS=${WHEEL_PARTS:-/tmp/wheelparts}
SITE=${SITE:-/tmp/site}
die() { echo "gpu_wheels.sh $CMD: $*" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

prepare() {
  local reqs=${GPU_WHEELS_REQUIREMENTS:-benchmarks/gpu_wheels.txt} out=${GPU_WHEELS_OUT:-.whl}
  local limit=${GPU_WHEELS_PART_BYTES:-$((60 * 1024 * 1024))}
  [ -f "$reqs" ] || die "no requirements file $reqs"
  tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/dl" "$tmp/send"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes --python-version "${GPU_WHEELS_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/dl" -r "$reqs"
  local want got
  want=$(grep -cE '^[A-Za-z0-9]' "$reqs"); got=$(find "$tmp/dl" -name '*.whl' | wc -l)
  [ "$want" = "$got" ] || die "$reqs pins $want wheels but pip gave $got"
  (cd "$tmp/dl" && sha256sum -- *.whl) >"$tmp/SHA256SUMS"
  for w in "$tmp"/dl/*.whl; do
    if [ "$(stat -c %s "$w")" -gt "$limit" ]; then split -b "$limit" "$w" "$tmp/send/$(basename "$w").part-"
    else cp "$w" "$tmp/send/"; fi
  done
  (cd "$tmp/send" && sha256sum -- *.part-*) >>"$tmp/SHA256SUMS" 2>/dev/null || true
  # first fit, largest first: the fewest batches (each one transfer call)
  rm -rf "$out" && mkdir -p "$out"
  local -a used=()
  local f size b
  while read -r size f; do
    for ((b = 0; b <= ${#used[@]}; b++)); do
      if [ "$b" = "${#used[@]}" ] || [ $((used[b] + size)) -le "$limit" ]; then
        used[b]=$(( ${used[b]:-0} + size )); mkdir -p "$out/batch-$((b + 1))"
        cp "$tmp/send/$f" "$out/batch-$((b + 1))/"; break
      fi
    done
  done < <(cd "$tmp/send" && stat -c '%s %n' -- * | sort -rn)
  for d in "$out"/batch-*; do cp "$tmp/SHA256SUMS" "$d/"; done
  cp "$tmp/SHA256SUMS" "$out/"
  for d in "$out"/batch-*; do echo "$d: $(ls "$d" | grep -vc SHA256SUMS) files, $(mib "$(du -sb "$d" | cut -f1)")"; done
  echo "on the GPU machine, one call per batch, back to back (it stays warm ~30 s after each call):"
  echo "  carry [\"$out/batch-N\"], command: bash benchmarks/gpu_wheels.sh receive $out/batch-N"
  echo "then in the call with the last batch: ... && GPU_CHECK_PART=dali bash benchmarks/gpu_check.sh"
}

receive() {
  local dir=${1:-}
  [ -n "$dir" ] && [ -d "$dir" ] || die "usage: gpu_wheels.sh receive DIR (a .whl/batch-N folder)"
  [ -f "$dir/SHA256SUMS" ] || die "$dir has no SHA256SUMS (made by gpu_wheels.sh prepare)"
  local f n=0 bytes=0
  for f in "$dir"/*; do
    f=$(basename "$f"); [ "$f" = SHA256SUMS ] && continue
    grep -qxF "$f" < <(cut -d' ' -f3- "$dir/SHA256SUMS") || die "$dir/$f is not in its SHA256SUMS"
    n=$((n + 1)); bytes=$((bytes + $(stat -c %s "$dir/$f")))
  done
  (cd "$dir" && sha256sum -c --ignore-missing --quiet SHA256SUMS) || die "$dir: checksum mismatch (above); send it again"
  mkdir -p "$PARTS"
  if [ -f "$PARTS/SHA256SUMS" ] && ! cmp -s "$PARTS/SHA256SUMS" "$dir/SHA256SUMS"; then
    die "$PARTS holds batches of another preparation (SHA256SUMS differ); empty it first"
  fi
  cp "$dir"/* "$PARTS/"
  local total have
  total=$(travelling | wc -l); have=$(travelling | while read -r _ f; do if [ -f "$PARTS/$f" ]; then echo; fi; done | wc -l)
  echo "$dir: $n files, $(mib "$bytes"), sha256 OK; $PARTS holds $have of the $total files"
}

travelling() {  # manifest lines of the files that are sent: parts, and wheels that were not split
  local manifest=${1:-$PARTS/SHA256SUMS} h f
  while read -r h f; do
    if [[ $f == *.part-* ]] || ! grep -qF "  $f.part-" "$manifest"; then echo "$h  $f"; fi
  done <"$manifest"
}

install() {
  [ -f "$PARTS/SHA256SUMS" ] \
    || die "no $PARTS/SHA256SUMS: send the batches first (gpu_wheels.sh receive .whl/batch-N, one call each)"
  local missing h f
  missing=$(travelling | while read -r h f; do if [ ! -f "$PARTS/$f" ]; then echo "$f"; fi; done)
  [ -z "$missing" ] || die "missing $(echo "$missing" | wc -l) file(s), send their batches again: $(echo $missing)"
  (cd "$PARTS" && travelling | sha256sum -c --quiet -) || die "checksum mismatch (above): send that batch again"
  joined=$(mktemp -d) && trap 'rm -rf "$joined"' EXIT
  while read -r h f; do
    [[ $f == *.whl ]] || continue
    if [ -f "$PARTS/$f" ]; then ln -s "$PARTS/$f" "$joined/$f"; continue; fi
    cat "$PARTS/$f".part-* >"$joined/$f"
    [ "$(sha256sum <"$joined/$f" | cut -d' ' -f1)" = "$h" ] \
      || die "$f joined from $(ls "$PARTS/$f".part-* | wc -l) parts does not match its sha256" \
             "(a part truncated or missing); nothing installed"
    echo "joined $f ($(mib "$(stat -c %s "$joined/$f")"), sha256 OK)"
  done <"$PARTS/SHA256SUMS"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$joined"/*.whl
  echo "installed $(ls "$joined" | wc -l) wheels into $SITE (add it to PYTHONPATH)"
}

case "$CMD" in
  prepare) prepare ;;
  receive) receive "${2:-}" ;;
  install) install ;;
  *) die "unknown command (prepare | receive DIR | install)" ;;
esac
