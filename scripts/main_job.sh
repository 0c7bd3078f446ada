#!/usr/bin/env bash
# The main job: install, then train a tiny LLaViT through both stages on the built-in synthetic data
# on the CPU, evaluate it and print the miniature ablation table (LLaViT vs LLaVA-1.5 and
# single-component ablations). Outputs: $OUT_DIR/{results.json,table.md,loss_curves.png,*/loss.png}.
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
