#!/usr/bin/env bash
# The main job on embedded data (no network): short runs of every landed domain, then a summary table.
#   scripts/demo.sh [DOMAIN ...]   (all domains by default: core vision timeseries rl speech longrange; sets up Debian
#                                   packages and .venv when missing; figures and times in the summary)
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
export PYTHONWARNINGS=ignore
# one torch thread per process unless told otherwise: these models are small, and on a shared 2-core machine
# torch's default of two spinning OpenMP threads was measured 5-20x slower than one
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUNS=${DEMO_RUNS:-runs/demo}
QUIET=(--trainer.enable_progress_bar=false --trainer.enable_model_summary=false --run.root="$RUNS")
rows=()
started=$(date +%s)

# run_step DOMAIN WHAT RESULT_COMMAND -- COMMAND...: times COMMAND, then records RESULT_COMMAND's output
wanted=("$@")
run_step() {
  local domain=$1 what=$2 result_cmd=$3; shift 4
  if ((${#wanted[@]})) && [[ ! " ${wanted[*]} " == *" $domain "* ]]; then return; fi
  echo; echo "=== $domain: $what"; echo "\$ $*"
  local t0; t0=$(date +%s)
  "$@" 2>&1 | grep --line-buffered -vE "^(💡|GPU available|TPU available|HPU available|LOCAL_RANK)" || { echo "demo: $domain failed"; exit 1; }
  local seconds=$(( $(date +%s) - t0 ))
  local result; result=$(eval "$result_cmd")
  rows+=("$domain|$what|$result|${seconds}s")
}

# --- core: a tiny encoder learns to sort sequences of 12 symbols -------------------------------------------------
run_step core "encoder sorts 12 symbols (fit + test)" \
  "python scripts/run_metrics.py $RUNS/core/sort_tiny test/token_acc test/sequence_acc" -- \
  bash -c "polyformer fit -c configs/core/sort_tiny.yaml ${QUIET[*]} && \
           polyformer test -c configs/core/sort_tiny.yaml ${QUIET[*]} --ckpt_path=last"

# --- vision: ViT on scikit-learn's bundled 8x8 digits (120 of the config's 240 epochs: ~2 min on one core) ----------
run_step vision "ViT-tiny digits, 120 epochs (fit + test)" \
  "python scripts/run_metrics.py $RUNS/vision/vit_tiny_digits test/acc1" -- \
  bash -c "polyformer fit -c configs/vision/vit_tiny_digits.yaml ${QUIET[*]} --trainer.max_epochs=120 && \
           polyformer test -c configs/vision/vit_tiny_digits.yaml ${QUIET[*]} --ckpt_path=last"

# --- vision: the committed detector draws its boxes on two BCCD val images, then is scored on all 87 -----------------
DETECTOR=(-c configs/vision/deformable_detr_bccd.yaml "${QUIET[@]}" --ckpt_path=weights/vision/deformable_detr_bccd.ckpt
          --data.init_args.test_split=val --data.init_args.eval_batch_size=2)
detect() {
  polyformer predict "${DETECTOR[@]}" --trainer.limit_predict_batches=1 &&
    echo "pictures (true boxes green, detections red):" &&
    ls "$(ls -d "$RUNS"/vision/deformable_detr_bccd/version_* | sort -V | tail -1)"/predictions/*.png &&
    polyformer test "${DETECTOR[@]}"
}
run_step vision "Deformable DETR, committed weights, BCCD val (draw 2 + test 87)" \
  "python scripts/run_metrics.py $RUNS/vision/deformable_detr_bccd test/map50 test/map" -- detect

# --- time series: PatchTST on statsmodels' bundled Mauna Loa CO2 series (univariate) -------------------------------
run_step timeseries "PatchTST Mauna Loa CO2 (fit + test)" \
  "python scripts/run_metrics.py $RUNS/timeseries/patchtst_co2_demo test/mse test/mae" -- \
  bash -c "polyformer fit -c configs/timeseries/patchtst_co2_demo.yaml ${QUIET[*]} && \
           polyformer test -c configs/timeseries/patchtst_co2_demo.yaml ${QUIET[*]} --ckpt_path=last"

# --- RL: Decision Transformer on the project's own CartPole-v1 data, then rollouts at targets 50..500 --------------
rl_result() {
  python - "$RUNS" <<'PY'
import glob, json, sys
path = sorted(glob.glob(f"{sys.argv[1]}/rl/dt_cartpole/version_*/eval.json"), key=lambda p: int(p.split("version_")[1].split("/")[0]))[-1]
rows = json.load(open(path))
print(" ".join(f"R@{r['target']:.0f}={r['return_mean']:.0f}" for r in rows if r["target"] in (50, 200, 500)))
PY
}
run_step rl "Decision Transformer CartPole-v1 (fit + rollouts)" rl_result -- \
  polyformer fit -c configs/rl/dt_cartpole.yaml "${QUIET[@]}"

# --- speech: Conformer-CTC on a small espeak-ng corpus in LibriSpeech layout ---------------------------------------
SPEECH_DATA=${DEMO_SPEECH_DATA:-data/speech_demo}
run_step speech "Conformer-CTC, synthetic speech (make + fit + test)" \
  "python scripts/run_metrics.py $RUNS/speech/conformer_ctc_demo_synthetic test/test/cer test/test/wer" -- \
  bash -c "python scripts/make_synthetic_librispeech.py --out $SPEECH_DATA --train-utterances 800 --dev 50 \
             --test 100 --heldout 50 --max-words 10 --seed 0 && \
           polyformer fit -c configs/speech/conformer_ctc_demo_synthetic.yaml ${QUIET[*]} \
             --data.init_args.root=$SPEECH_DATA && \
           polyformer test -c configs/speech/conformer_ctc_demo_synthetic.yaml ${QUIET[*]} \
             --data.init_args.root=$SPEECH_DATA --ckpt_path=last"

# --- speech: the committed real-LibriSpeech model transcribes three real dev utterances (domains/speech/samples) ---
REAL_SPEECH=(-c configs/speech/conformer_ctc_tiny_real.yaml "${QUIET[@]}"
             --ckpt_path=weights/speech/conformer_ctc_tiny_real.ckpt
             --data.init_args.root=domains/speech/samples "--data.init_args.test_splits=[dev]")
real_speech() { polyformer predict "${REAL_SPEECH[@]}" && polyformer test "${REAL_SPEECH[@]}"; }
run_step speech "Conformer-CTC, committed weights, 3 real utterances" \
  "python scripts/run_metrics.py $RUNS/speech/conformer_ctc_tiny_real test/cer test/wer" -- real_speech

# --- longrange: the committed LRA Text and ListOps models on 3 validation examples each, and the validation split ---
mkdir -p "$RUNS/longrange"
long_range() {
  python scripts/longrange_examples.py --task text --weights weights/longrange/text_80min.ckpt \
    | tee "$RUNS/longrange/text.txt" &&
  python scripts/longrange_examples.py --task listops --weights weights/longrange/listops.ckpt \
    | tee "$RUNS/longrange/listops.txt"
}
run_step longrange "LRA Text + ListOps, committed weights (3 + val each)" \
  "echo \"Text val acc \$(tail -1 $RUNS/longrange/text.txt | cut -d' ' -f3), ListOps \$(tail -1 $RUNS/longrange/listops.txt | cut -d' ' -f3)\"" \
  -- long_range

echo
echo "=== summary (total $(( $(date +%s) - started )) s; runs under $RUNS/)"
printf '%-11s | %-52s | %-48s | %s\n' domain run result time
printf '%s\n' "------------+------------------------------------------------------+--------------------------------------------------+------"
for row in "${rows[@]}"; do
  IFS='|' read -r d w r s <<<"$row"
  printf '%-11s | %-52s | %-48s | %s\n' "$d" "$w" "$r" "$s"
done
