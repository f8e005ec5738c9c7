#!/usr/bin/env bash
# The accuracy suite on 2 CPU cores, in the order that gives the most information first: the
# learning-rate and initialisation selection, seed 0 of every task, the two main ablations (fusion,
# projection) at seed 0, then seeds 1 and 2 of both, then EPT's module variants, the other recipe
# variants and the subspace-count ablations. Each phase resumes where an interrupted one stopped, so
# the script can be stopped and started again. Usage: bash benchmarks/cpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { "$PY" benchmarks/accuracy.py run --jobs 2 --threads 1 "$@"; }
run --phase select --methods pt,dept,ept,head,lora,full
run --phase final --seeds 0
run --phase ablation --seeds 0 --methods ept_no_fusion,ept_no_projection
for seed in 1 2; do
  run --phase final --seeds $seed
  run --phase ablation --seeds $seed --methods ept_no_fusion,ept_no_projection
done
run --phase tune --seeds 0
run --phase recipe --seeds 0
run --phase ablation --seeds 0,1,2
