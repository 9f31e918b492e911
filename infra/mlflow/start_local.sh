#!/usr/bin/env bash
# A development copy of the shared tracking server on 127.0.0.1: PostgreSQL from the OS packages, moto's
# S3-compatible server and `mlflow server` with proxied artifacts (orchestration/services.py).
#   infra/mlflow/start_local.sh            # prints: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
#   infra/mlflow/start_local.sh down
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-.venv/bin/python}"
exec "$python" -m orchestration.services "${1:-up}" --dir "${STACK_DIR:-runs/stack}"
