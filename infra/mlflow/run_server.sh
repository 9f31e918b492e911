#!/usr/bin/env bash
# The shared tracking server: PostgreSQL metadata, S3 artifacts served through the server (proxied), basic auth.
#   infra/mlflow/run_server.sh infra/mlflow/mlflow.env
# Clients then use: MLFLOW_TRACKING_URI=http://HOST:5000 MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...
set -euo pipefail
env_file="${1:-infra/mlflow/mlflow.env}"
if [[ ! -f "$env_file" ]]; then
    echo "run_server.sh: $env_file not found; copy infra/mlflow/mlflow.env.example and fill it in" >&2
    exit 2
fi
set -a
# shellcheck disable=SC1090
source "$env_file"
set +a
for key in MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION MLFLOW_AUTH_CONFIG_PATH MLFLOW_FLASK_SERVER_SECRET_KEY; do
    if [[ -z "${!key:-}" || "${!key}" == *CHANGE_ME* ]]; then
        echo "run_server.sh: $key is not set in $env_file" >&2
        exit 2
    fi
done
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server \
    --app-name basic-auth \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-4}"
