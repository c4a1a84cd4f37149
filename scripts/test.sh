#!/usr/bin/env bash
# Set up .venv (if missing) and run the whole test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m pytest -q tests "$@"
