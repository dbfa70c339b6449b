#!/usr/bin/env bash
# Runs the test suite on any machine: sets up Debian packages and .venv when missing, then pytest.
#   scripts/test.sh [pytest arguments]
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
# one torch thread per process unless told otherwise (tests spawn several processes; see demo.sh)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest "$@"
