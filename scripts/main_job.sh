#!/usr/bin/env bash
# The main job: install, then run the paper's ablation in miniature on the CPU (pre-trains a tiny ViT
# and a tiny text-only LM, trains the LLaVA-1.5 baseline, + image QKV, + bidirectional, + multi-layer
# = LLaViT and the image-to-image-blocked control through both stages, evaluates after each stage).
# Outputs: $OUT_DIR/{results.json,table.md,accuracy.png,loss_curves.png,pretrained/,*/loss.png}.
#   scripts/main_job.sh            # full main job
#   scripts/main_job.sh --quick    # CI-size smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/demo}
if ! python -c "import llavit_kernels, transformers, safetensors, PIL, tqdm, matplotlib" 2>/dev/null; then
  python -m pip install -q -e ".[train]"
fi
start=$(date +%s)
python -m llavit_kernels.train demo --output-dir "$OUT_DIR" "$@"
echo "main job wall time: $(( $(date +%s) - start )) s"
