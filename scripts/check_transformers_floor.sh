#!/usr/bin/env bash
# Run the Hugging Face integration tests against one transformers version, in a venv of its own.
#
#   scripts/check_transformers_floor.sh [VERSION] [--reuse-site SITE_PACKAGES]
#
# VERSION defaults to the floor the package declares (MIN_TRANSFORMERS in
# llavit_kernels/integrations/__init__.py, which setup.py repeats). The venv lives in
# ${LLAVIT_FLOOR_VENV:-/tmp/llavit-transformers-VERSION} and is reused by later runs.
#
# --reuse-site PATH: do not install torch/triton/numpy into the new venv; borrow them from an existing
# site-packages (e.g. the project's venv) through a .pth file. Packages installed into the new venv
# (transformers VERSION and its own pinned dependencies: tokenizers, huggingface-hub, ...) come first
# on sys.path, so they shadow the borrowed ones. Without it, torch is installed too (large download).
#
# Needs network access to a package index. Not run in CI (the download and install take minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=""
REUSE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --reuse-site) REUSE="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) VERSION="$1"; shift ;;
    esac
done
if [ -z "$VERSION" ]; then
    VERSION=$(sed -n 's/^MIN_TRANSFORMERS = "\([0-9.]*\)".*/\1/p' llavit_kernels/integrations/__init__.py)
fi
VENV=${LLAVIT_FLOOR_VENV:-/tmp/llavit-transformers-$VERSION}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    if [ -n "$REUSE" ]; then
        SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$REUSE" > "$SITE/zz_llavit_borrowed.pth"  # appended after the venv's own site-packages
    fi
fi
PKGS=("transformers==$VERSION" safetensors pytest hypothesis einops)
if [ -z "$REUSE" ]; then
    PKGS+=(torch "numpy<2.4" "triton==3.6.0")
fi
"$VENV/bin/python" -m pip install -q "${PKGS[@]}"
"$VENV/bin/python" - <<PY
import transformers, torch
print(f"transformers {transformers.__version__} from {transformers.__file__}; torch {torch.__version__}")
assert transformers.__version__.startswith("$VERSION"), transformers.__version__
PY
export PYTHONPATH="$ROOT:$ROOT/tests"
TESTS=(tests/test_integration_transformers.py tests/test_generation.py tests/test_integration_families.py
       tests/test_integration_multimodal_families.py)
if "$VENV/bin/python" -c "import peft" 2>/dev/null; then TESTS+=(tests/test_integration_peft.py); fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
