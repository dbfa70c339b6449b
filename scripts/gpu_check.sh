#!/usr/bin/env bash
# The one command to run when a GPU is there (about 8 minutes on one H100): the core's checks (scripts/gpu_check.py:
# bf16, the SDPA kernels that take our attention, torch.compile, MFU from counted FLOPs, peak memory), then short
# bf16-mixed fits of the core's sorting task, eager and --compile true on one GPU and FSDP over every visible GPU,
# then every domain's training step on its embedded data (ViT and Swin on digits, PatchTST on CO2, the Decision
# Transformer on CartPole, the long-range classifier on generated ListOps, the Conformer on the bundled LibriSpeech
# samples, and the deformable detector on BCCD where ../shared holds it), eager and compiled; each rank's step time
# and peak memory from polyformer.distributed.RankReport. Everything lands in bench_out/gpu_check/summary.json.
#   scripts/gpu_check.sh            # on a GPU machine
#   scripts/gpu_check.sh --dry-run  # the same on CPU (small shapes, 32-bit, FSDP over 2 processes, the domains'
#                                   # steps eager only): what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then source .venv/bin/activate; else pip install -q -e . >/dev/null; fi
out=bench_out/gpu_check
rm -rf "$out" && mkdir -p "$out"
if [ "${1:-}" = "--dry-run" ]; then
  device=cpu; accelerator=cpu; precision=32-true; gpus=2; steps=4; strategy=fsdp; domain_steps=2; compiled=(false)
  export OMP_NUM_THREADS=1
else
  device=cuda; accelerator=gpu; precision=bf16-mixed; steps=200; strategy=fsdp; domain_steps=30; compiled=(false true)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
fi
python scripts/gpu_check.py --device "$device" --json "$out/core.json"
fit() {  # name config devices strategy steps [extra options...]
  local name=$1 config=$2 devices=$3 strategy=$4 max_steps=$5; shift 5
  printf 'trainer:\n  callbacks:\n    - class_path: polyformer.distributed.RankReport\n      init_args:\n        folder: %s\n' \
    "$out/$name" > "$out/$name.yaml"
  polyformer fit -c "$config" -c "$out/$name.yaml" --run.root="$out/runs" --run.name="$name" \
    --trainer.accelerator="$accelerator" --trainer.devices="$devices" --trainer.strategy="$strategy" \
    --trainer.precision="$precision" --trainer.max_steps="$max_steps" --trainer.max_epochs=-1 --trainer.max_time=null \
    --trainer.limit_val_batches=0 --trainer.enable_progress_bar=false --trainer.enable_model_summary=false "$@" \
    > "$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; exit 1; }
}
sort=(--model.init_args.encoder.dim=512 --model.init_args.encoder.depth=6 --model.init_args.encoder.heads=8)
fit eager configs/core/sort_tiny.yaml 1 auto "$steps" "${sort[@]}"
fit compiled configs/core/sort_tiny.yaml 1 auto "$steps" "${sort[@]}" --compile true
fit fsdp configs/core/sort_tiny.yaml "$gpus" "$strategy" "$steps" "${sort[@]}" --sharding.activation_checkpointing true
# every domain's training step on data that ships with the repository (or that a config generates)
domain_runs=()
domain() {  # name config [extra options...]
  local name=$1 config=$2; shift 2
  for compile in "${compiled[@]}"; do
    echo "domain step: $name (compile $compile)"
    fit "domain_${name}_compile_$compile" "$config" 1 auto "$domain_steps" --compile "$compile" "$@"
    domain_runs+=("domain_${name}_compile_$compile")
  done
}
domain vision configs/vision/vit_tiny_digits.yaml
domain swin configs/vision/swin_tiny_digits.yaml
domain timeseries configs/timeseries/patchtst_co2_demo.yaml
domain rl configs/rl/dt_cartpole.yaml --model.init_args.evaluation=null
domain longrange configs/longrange/listops.yaml --data.init_args.spec.train=256 --data.init_args.spec.val=16 \
  --data.init_args.spec.test=16
domain speech configs/speech/conformer_ctc_tiny_real.yaml --data.init_args.root=domains/speech/samples \
  "--data.init_args.train_splits=[dev]" "--data.init_args.val_splits=[dev]" "--data.init_args.test_splits=[dev]"
if [ -d ../shared/data/vision/bccd ]; then
  domain detection configs/vision/deformable_detr_bccd.yaml
else
  echo "domain step: detection skipped (no BCCD images at ../shared/data/vision/bccd)"
fi
python - "$out" "${domain_runs[@]}" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"core": json.loads((out / "core.json").read_text())}
for name in ("eager", "compiled", "fsdp", *sys.argv[2:]):
    summary[name] = [json.loads(p.read_text()) for p in sorted((out / name).glob("rank*.json"))]
    print(name, [{k: r[k] for k in ("rank", "world_size", "step_seconds", "peak_rss_mb", "peak_cuda_mb")}
                 for r in summary[name]])
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {out / 'summary.json'}")
PY
