#!/usr/bin/env bash
# `make gpu-check`. Here (no CUDA): build the wheelhouse the device needs and say how to run the check
# there. On the device (its python3 has torch and sees a GPU): install the wheelhouse against that torch
# and run the check, writing gpu_check.json and gpu_check.log to $OUT. DRY_RUN=1: the same check on the
# CPU at tiny sizes, in a stand-in for the device image (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}

if [ "${DRY_RUN:-0}" = 1 ]; then
  exec .venv/bin/python -m launch.gpu_check dry-run --output-dir "$OUT"
fi

if [ ! -x .venv/bin/python ] && python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  tag=$(python3 -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
  wheels=.gpu-check/wheels-$tag
  [ -d "$wheels" ] || { echo "gpu-check: $wheels is missing: run 'make gpu-check' on the dev machine and carry it" >&2; exit 1; }
  site=/tmp/autosam2-site
  start=$(date +%s)
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$wheels"/*.whl
  echo "gpu-check: installed $(ls "$wheels"/*.whl | wc -l) wheels in $(( $(date +%s) - start )) s"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  exec python3 -m launch.gpu_check run --output-dir "$OUT"
fi

exec .venv/bin/python -m launch.gpu_check wheels
