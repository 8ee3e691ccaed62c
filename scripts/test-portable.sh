#!/usr/bin/env bash
# Run the fast suite under other CPU kernel choices, as another machine would pick them:
# ATen's generic (no-SIMD) and AVX2 kernels, and MKL restricted to SSE4.2 / AVX2 with its
# conditional-numerical-reproducibility mode. An assertion that passes by default but fails
# here compares two computation paths bitwise; give it a tolerance (tests/numerics.py).
# Usage: bash scripts/test-portable.sh [pytest args]   (about 3x the fast suite's time)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
status=0
while read -r settings; do
  echo "== $settings"
  env $settings "$PY" -m pytest -p no:cacheprovider -W ignore "$@" || status=1  # pyproject adds -q; a second -q hides the summary line
done <<'SETTINGS'
ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 MKL_CBWR=COMPATIBLE
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
SETTINGS
exit $status
