#!/usr/bin/env bash
# Set up .venv (first run: about 2 minutes) and run the whole test suite.
#   bash scripts/test.sh [pytest arguments]
# The browser tests (marker `browser`) drive the web board in Debian's chromium; it is installed here when missing
# and apt is usable (playwright cannot download its own browser on these machines). Without it they are skipped
# with the reason. The fast inner loop: -m "not slow and not distributed and not browser" (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
TUNELAB_EXTRAS=test,quantization,methods,video,deepspeed bash scripts/setup.sh
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "[test] installing chromium and a CJK font for the browser tests (about 90 s)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-wqy-microhei; } >/dev/null \
    || echo "[test] could not install chromium; the browser tests will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
