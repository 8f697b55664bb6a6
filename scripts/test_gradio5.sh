#!/usr/bin/env bash
# Run the web tests (the board in the browser, the chat page) on the lowest gradio tunelab declares, 5.50, in a venv
# of its own (.venv-gradio5; first run about 3 minutes). The main suite runs them on the newest gradio 6.
#   bash scripts/test_gradio5.sh [pytest arguments]
# gradio 5.50 pins huggingface-hub < 2, starlette < 1 and pandas < 3, so pip picks older versions of those than in
# .venv; torch and transformers stay at the pins of constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-gradio5
[ -x $venv/bin/python ] || python3 -m venv $venv
pip_install() { $venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
$venv/bin/python -c "import torch" 2>/dev/null || pip_install -c constraints.txt torch
$venv/bin/python -c "import gradio, sys; sys.exit(gradio.__version__ != '5.50.0')" 2>/dev/null \
  || pip_install -c constraints.txt -e ".[test]" "gradio==5.50.0"
$venv/bin/python -c "import gradio; print('[gradio5] gradio', gradio.__version__)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec $venv/bin/python -m pytest tests/webui/test_webui_browser.py tests/webui/test_webui.py "tests/infer/test_infer.py::test_webchat_page_answers_through_its_api" "$@"
