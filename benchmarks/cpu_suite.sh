#!/usr/bin/env bash
# The accuracy suite on 2 CPU cores, in the order that gives the most information first: the learning-
# rate study, the prompt-initialisation variants, seed 0 of every task, the other recipe and EPT-module
# variants, then seeds 1 and 2, then the ablations. Each phase resumes where an interrupted one
# stopped, so the script can be stopped and started again. Usage: bash benchmarks/cpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { "$PY" benchmarks/accuracy.py run --jobs 2 --threads 1 "$@"; }
run --phase select --methods pt,dept,ept,head,lora,full
run --phase recipe --seeds 0 --only init
run --phase final --seeds 0
run --phase recipe --seeds 0
run --phase tune --seeds 0
run --phase final --seeds 1
run --phase final --seeds 2
run --phase ablation --seeds 0,1,2
