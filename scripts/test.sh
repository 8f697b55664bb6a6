#!/usr/bin/env bash
# Set up .venv (first run: about 2 minutes) and run the whole test suite.
#   bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
TUNELAB_EXTRAS=test,quantization bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
