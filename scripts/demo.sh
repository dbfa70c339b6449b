#!/usr/bin/env bash
# The main job on embedded data (no network): short runs of every landed domain, then a summary table.
#   scripts/demo.sh            (sets up Debian packages and .venv when missing; about N minutes on 2 CPU cores)
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
export PYTHONWARNINGS=ignore
RUNS=${DEMO_RUNS:-runs/demo}
QUIET=(--trainer.enable_progress_bar=false --trainer.enable_model_summary=false --run.root="$RUNS")
rows=()
started=$(date +%s)

# run_step DOMAIN WHAT RESULT_COMMAND -- COMMAND...: times COMMAND, then records RESULT_COMMAND's output
run_step() {
  local domain=$1 what=$2 result_cmd=$3; shift 4
  echo; echo "=== $domain: $what"; echo "\$ $*"
  local t0; t0=$(date +%s)
  "$@" 2>&1 | grep -vE "^(💡|GPU available|TPU available|HPU available|LOCAL_RANK)" || { echo "demo: $domain failed"; exit 1; }
  local seconds=$(( $(date +%s) - t0 ))
  local result; result=$(eval "$result_cmd")
  rows+=("$domain|$what|$result|${seconds}s")
}

# --- core: a tiny encoder learns to sort sequences of 12 symbols -------------------------------------------------
run_step core "encoder sorts 12 symbols (fit + test)" \
  "python scripts/run_metrics.py $RUNS/core/sort_tiny test/token_acc test/sequence_acc" -- \
  bash -c "polyformer fit -c configs/core/sort_tiny.yaml ${QUIET[*]} && \
           polyformer test -c configs/core/sort_tiny.yaml ${QUIET[*]} --ckpt_path=last"

echo
echo "=== summary (total $(( $(date +%s) - started )) s; runs under $RUNS/)"
printf '%-11s | %-44s | %-48s | %s\n' domain run result time
printf '%s\n' "------------+----------------------------------------------+--------------------------------------------------+------"
for row in "${rows[@]}"; do
  IFS='|' read -r d w r s <<<"$row"
  printf '%-11s | %-44s | %-48s | %s\n' "$d" "$w" "$r" "$s"
done
