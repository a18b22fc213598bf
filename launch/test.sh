#!/usr/bin/env bash
# Set up and run the whole test suite on 8 simulated CPU devices (tests/conftest.py sets them).
set -euo pipefail
cd "$(dirname "$0")/.."
TMDM_EXTRAS=test,tpu,export bash launch/setup.sh
exec .venv/bin/python -m pytest tests "$@"  # pyproject addopts has -q (a second -q hides the "N passed" line)
