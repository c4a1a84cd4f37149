#!/usr/bin/env bash
# Set up .venv (if missing) and run the test suite: bash scripts/test.sh [pytest args]
# With no test path among the arguments, all of tests/ (e.g. -m "not slow": the fast tier); with paths, those only
# (bash scripts/test.sh tests/test_config.py, tests/test_flow.py::test_x), in one process.  All of tests/ runs on one
# pytest-xdist worker per core, longest tests first (tests/conftest.py); -n 0 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
paths=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        paths=()
        break
    fi
done
workers=()
if [[ ${#paths[@]} -gt 0 && " $* " != *" -n "* && " $* " != *" -n"[0-9a]* ]]; then
    workers=(-n "$(nproc)" --dist load)
fi
python -m pytest -q "${paths[@]}" "${workers[@]}" "$@"
