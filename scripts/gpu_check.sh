#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: bf16, flash SDPA, torch.compile and throughput of the core, then a short
# bf16-mixed `polyformer fit` that logs samples/s and MFU. Figures land in bench_out/.
#   scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then source .venv/bin/activate; else pip install -q -e . >/dev/null; fi
mkdir -p bench_out
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python scripts/gpu_check.py --device cuda --json bench_out/gpu_check.json
polyformer fit -c configs/core/sort_tiny.yaml --run.root=bench_out/runs --trainer.accelerator=gpu \
  --trainer.devices=1 --trainer.precision=bf16-mixed --trainer.max_epochs=2 --trainer.enable_progress_bar=false
python - <<'PY'
import csv, glob
rows = list(csv.DictReader(open(sorted(glob.glob("bench_out/runs/core/sort_tiny/version_*/metrics.csv"))[-1])))
last = {k: v for r in rows for k, v in r.items() if v}
print({k: last[k] for k in last if "per_sec" in k or "mfu" in k or k.startswith("val/")})
PY
