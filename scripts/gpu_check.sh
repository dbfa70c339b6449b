#!/usr/bin/env bash
# The one command to run when a GPU is there (about 5 minutes on one H100): the core's checks (scripts/gpu_check.py:
# bf16, the SDPA kernels that take our attention, torch.compile, MFU from counted FLOPs, peak memory), then short
# bf16-mixed fits of the core's sorting task, eager and --compile true on one GPU and FSDP over every visible GPU,
# each rank's step time and peak memory from polyformer.distributed.RankReport. Everything lands in
# bench_out/gpu_check/summary.json.
#   scripts/gpu_check.sh            # on a GPU machine
#   scripts/gpu_check.sh --dry-run  # the same on CPU (small shapes, 32-bit, FSDP over 2 processes): what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then source .venv/bin/activate; else pip install -q -e . >/dev/null; fi
out=bench_out/gpu_check
rm -rf "$out" && mkdir -p "$out"
if [ "${1:-}" = "--dry-run" ]; then
  device=cpu; accelerator=cpu; precision=32-true; gpus=2; steps=4; strategy=fsdp
  export OMP_NUM_THREADS=1
else
  device=cuda; accelerator=gpu; precision=bf16-mixed; steps=200; strategy=fsdp
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
fi
python scripts/gpu_check.py --device "$device" --json "$out/core.json"
fit() {  # name devices strategy [extra options...]
  local name=$1 devices=$2 strategy=$3; shift 3
  printf 'trainer:\n  callbacks:\n    - class_path: polyformer.distributed.RankReport\n      init_args:\n        folder: %s\n' \
    "$out/$name" > "$out/$name.yaml"
  polyformer fit -c configs/core/sort_tiny.yaml -c "$out/$name.yaml" --run.root="$out/runs" --run.name="$name" \
    --trainer.accelerator="$accelerator" --trainer.devices="$devices" --trainer.strategy="$strategy" \
    --trainer.precision="$precision" --trainer.max_steps="$steps" --trainer.max_epochs=-1 \
    --trainer.limit_val_batches=0 --trainer.enable_progress_bar=false --trainer.enable_model_summary=false \
    --model.init_args.encoder.dim=512 --model.init_args.encoder.depth=6 --model.init_args.encoder.heads=8 "$@" \
    > "$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; exit 1; }
}
fit eager 1 auto
fit compiled 1 auto --compile true
fit fsdp "$gpus" "$strategy" --sharding.activation_checkpointing true
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"core": json.loads((out / "core.json").read_text())}
for name in ("eager", "compiled", "fsdp"):
    summary[name] = [json.loads(p.read_text()) for p in sorted((out / name).glob("rank*.json"))]
    print(name, [{k: r[k] for k in ("rank", "world_size", "step_seconds", "peak_rss_mb", "peak_cuda_mb")}
                 for r in summary[name]])
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(f"wrote {out / 'summary.json'}")
PY
