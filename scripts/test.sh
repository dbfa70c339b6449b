#!/usr/bin/env bash
# Runs the test suite on any machine: sets up Debian packages and .venv when missing, then pytest.
#   scripts/test.sh [pytest arguments]
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
python -m pytest "$@"
