#!/usr/bin/env bash
# GPU check, at most ~8 minutes on one CUDA machine: DDP training over NCCL (2 processes with 2+ GPUs, else 1)
# in mixed precision (bf16 autocast) on Fashion-MNIST: the full-precision resnet20, then ReActNet distilled from it.
# Prepares the data if needed, prints images/s per run and the results as JSON (also written to $OUT/result.json).
# Then the step benchmark (`bitbench perf step`): resnet18 at 224x224, batch 256, bf16 autocast, fp against every
# binary method, in what remains of the 8 minutes (at least 60 s): $OUT/step-resnet18.txt (table) and .json.
# Usage: bash scripts/gpu-check.sh [OUT]   (default OUT: runs/gpu-check; env: BITBENCH_VENV, BITBENCH_DATA_ROOT)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BITBENCH_VENV:-$HOME/.venvs/bitbench}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "gpu-check: no virtual environment at $VENV: run scripts/setup.sh first" >&2; exit 1; }
DATA="${BITBENCH_DATA_ROOT:-data}/fashion-mnist"
EPOCHS=2 BATCH=256 WORKERS=4 RUN_LIMIT_S=180

# Fail clearly, before any work, where there is no usable CUDA device.
gpus="$("$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    why = "torch was built without CUDA" if torch.version.cuda is None else "no NVIDIA GPU or driver is visible"
    sys.exit(f"gpu-check: no CUDA device ({why}; torch {torch.__version__}). Run this on a machine with a GPU.")
if not torch.distributed.is_nccl_available():
    sys.exit("gpu-check: this torch build has no NCCL backend")
print(torch.cuda.device_count())
EOF
)"
nproc=$(( gpus >= 2 ? 2 : 1 ))
OUT="$(mkdir -p "${1:-runs/gpu-check}" && cd "${1:-runs/gpu-check}" && pwd)"
echo "gpu-check: $gpus GPU(s) visible, training with $nproc process(es) over NCCL, bf16 autocast"

if [ ! -f "$DATA/manifest.json" ]; then
  echo "gpu-check: preparing Fashion-MNIST in $DATA"
  "$PY" -m benchmark prepare --dataset fashion-mnist --out "$DATA" --quiet
fi

runs="$OUT/runs"
rm -rf "$runs"  # measure a fresh run, never a cached one
for method in fp reactnet; do  # reactnet's teacher is the fp run just trained beside it
  echo "gpu-check: training $method (resnet20, $EPOCHS epochs, global batch $BATCH)"
  timeout --signal=TERM --kill-after=20 "$RUN_LIMIT_S" \
    "$VENV/bin/torchrun" --standalone --nnodes=1 --nproc-per-node="$nproc" -m benchmark train \
      --dataset fashion-mnist --data-dir "$DATA" --arch resnet20 --method "$method" --seed 0 --runs-root "$runs" \
      --set epochs="$EPOCHS" --set batch_size="$BATCH" --set workers="$WORKERS" --set amp=true \
      > "$OUT/$method.log" 2>&1 \
    || { rc=$?; echo "gpu-check: $method failed (exit $rc); last lines of $OUT/$method.log:" >&2
         tail -n 30 "$OUT/$method.log" >&2; exit 1; }
done

"$PY" - "$runs" "$OUT/result.json" <<'EOF'
import json
import sys
from pathlib import Path

import torch

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
nccl = torch.cuda.nccl.version()
result = {"gpu": torch.cuda.get_device_name(0), "gpus_visible": torch.cuda.device_count(),
          "torch": torch.__version__, "cuda": torch.version.cuda,
          "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl), "runs": {}}
for method in ("fp", "reactnet"):
    m = json.loads((runs / "fashion-mnist" / "resnet20" / method / "seed0" / "metrics.json").read_text())
    keep = ("world_size", "device", "epochs", "steps_per_epoch", "images_per_second", "train_seconds",
            "wall_seconds", "test_top1", "test_top1_at_best_val", "val_top1")
    result["runs"][method] = {k: m[k] for k in keep}
    print(f"gpu-check: {method:9s} {m['images_per_second']:10.0f} images/s  test top-1 {m['test_top1']:.2f}  "
          f"({m['world_size']} process(es), {m['wall_seconds']:.0f} s)")
tmp = out.with_name(out.name + ".tmp")
tmp.write_text(json.dumps(result, indent=2) + "\n")
tmp.replace(out)
print(json.dumps(result, indent=2))
EOF

# Step benchmark: fp vs each binary method on resnet18 / 224 px / batch 256 / bf16, within the 8-minute budget.
TOTAL_LIMIT_S=470
step_limit=$(( TOTAL_LIMIT_S - SECONDS ))
(( step_limit < 60 )) && step_limit=60
echo "gpu-check: step benchmark (resnet18, 224 px, batch 256, bf16 autocast), limit ${step_limit} s"
timeout --signal=TERM --kill-after=10 "$step_limit" \
  "$PY" -m benchmark perf step --arch resnet18 --image-size 224 --in-channels 3 --num-classes 1000 \
    --batch-size 256 --device cuda --amp --reps 10 --warmup 3 --json > "$OUT/step-resnet18.json.tmp" \
    2> "$OUT/step-resnet18.log" \
  || { rc=$?; echo "gpu-check: step benchmark failed (exit $rc); last lines of $OUT/step-resnet18.log:" >&2
       tail -n 30 "$OUT/step-resnet18.log" >&2; exit 1; }
mv "$OUT/step-resnet18.json.tmp" "$OUT/step-resnet18.json"
"$PY" - "$OUT/step-resnet18.json" "$OUT/step-resnet18.txt" <<'EOF'
import json
import sys
from pathlib import Path

from benchmark.perf.step import table

result = json.loads(Path(sys.argv[1]).read_text())
text = (f"{result['arch']}  batch {result['batch_size']}  {result['in_channels']}x{result['image_size']}x"
        f"{result['image_size']}  {result['device']}  amp {result['amp']}  median of {result['reps']}\n"
        + table(result) + "\n")
tmp = Path(sys.argv[2] + ".tmp")
tmp.write_text(text)
tmp.replace(sys.argv[2])
print(text, end="")
EOF
echo "gpu-check: done in ${SECONDS} s"
