#!/usr/bin/env bash
# Every benchmark's --quick (a few batches of everything: it checks the scripts, not results), each into its own
# temporary folder, so that a renamed flag or metric fails. .ci/run calls it after the suite: all twelve take about
# 28 minutes on 2 CPU cores (minutes: longrange 6.5, detection 3.8, speech_real 2.9, pretrain 2.3, deploy 2.1, rl +
# scale + seeds about 8, the other four under 1 each).
# For pretrain, detection and deploy a second pass with --reuse (reading the runs just made) must write the same JSON,
# byte for byte (the three benchmarks, both passes: 24.5 minutes, measured beside two other training processes).
#   scripts/bench_quick.sh [bench_name ...]   (all scripts/bench_*.py by default; sets up .venv when missing)
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
out=$(mktemp -d -t bench_quick.XXXXXX)
trap 'rm -rf "$out"' EXIT
# the benchmarks whose --reuse must write their JSON again byte for byte (a second pass over the same records)
reuse_checked=(bench_pretrain bench_detection bench_deploy)
names=("$@")
if ((${#names[@]} == 0)); then
  for script in scripts/bench_*.py; do names+=("$(basename "$script" .py)"); done
fi
quick() {  # quick NAME STEM OPTION...: NAME.py --quick OPTION... --json $out/STEM.json, its log's tail on failure
  local name=$1 stem=$2
  shift 2
  if ! python "scripts/$name.py" --quick "$@" --json "$out/$stem.json" >"$out/$stem.log" 2>&1; then
    tail -40 "$out/$stem.log"
    echo "bench_quick: $name --quick $* failed (its output above)"
    exit 1
  fi
}
summary=()
for name in "${names[@]}"; do
  echo "=== $name --quick"
  t0=$(date +%s)
  where=()  # every runner-based benchmark takes --out; the others write nothing but their JSON
  usage=$(python "scripts/$name.py" --help | sed -n '/^usage:/,/^$/p')  # the options, not the description's text
  if grep -q -- "\[--out " <<<"$usage"; then where=(--out "$out/$name"); fi
  quick "$name" "$name" "${where[@]}"
  [[ -s "$out/$name.json" ]] || { echo "bench_quick: $name --quick wrote no JSON"; exit 1; }
  if [[ " ${reuse_checked[*]} " == *" $name "* ]]; then  # --reuse on the runs just made writes the same bytes
    quick "$name" "$name.reuse" --reuse "${where[@]}"
    if ! cmp -s "$out/$name.json" "$out/$name.reuse.json"; then
      diff "$out/$name.json" "$out/$name.reuse.json" | head -40
      echo "bench_quick: $name --reuse wrote another JSON than the runs it read (the difference above)"
      exit 1
    fi
  fi
  summary+=("$name $(( $(date +%s) - t0 ))s")
done
printf '%s\n' "=== every --quick passed:" "${summary[@]}"
