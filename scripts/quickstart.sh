#!/usr/bin/env bash
# Set up .venv (first run: about 2 minutes), then fine-tune the embedded SmolLM2-135M-Instruct with LoRA on
# tunelab's identity data and show its answer to an identity question before and after (about 5 minutes on 2 cores).
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TUNELAB_EXTRAS= bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/quickstart.py examples/quickstart.yaml "$@"
