#!/usr/bin/env bash
# The GPU check of issue 14 (benchmarks/gpu_check.py): on one GPU in <= 8 minutes, a table and a JSON line of the
# CPEWS step against a plain ViT step (eager, fused AdamW, SDPA off, torch.compile), host-device syncs per step,
# the pool build and k-means against scikit-learn, the evaluation protocols, and a 2-trial sweep at gpu 0.5 each.
# Without CUDA: says so, runs the same code with tiny sizes on the CPU and exits 0 (CI runs it this way).
#
# Usage: benchmarks/gpu_check.sh [--dry-run] [--device cuda|cpu] [--budget-s 420] [--no-compile] [--no-sweep]
#                                [--sweep-cpu] [--repeats N] [--warmup N] [--json-out FILE] [--set KEY=VALUE ...]
# PYTHON selects the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
cd "$root"
export PYTHONUNBUFFERED=1
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
