#!/usr/bin/env bash
# The main job: install (once) and run the demo.
#   bash demo.sh                                  offline, on the real Gemma 3 270M base model
#   bash demo.sh --model google/gemma-3-1b-it     a real model (needs the hub, or a local folder)
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh demo
exec .venv/bin/gemma-local demo "$@"
