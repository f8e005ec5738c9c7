#!/usr/bin/env bash
# One-shot GPU benchmarks, in one call:
# 1. speed at the paper's setting: a T5-base-shaped model (random weights, no download), batch 32,
#    source length 256, target length 3, PT l=100 vs DePT/EPT m=60 r=30, fp32 and bf16;
# 2. decoder-only speed: a Llama-shaped model (d=1024, 8 layers, random weights), batch 16 x 256,
#    eptkit PT/EPT with the shared key/value prefix against PEFT's PT (benchmarks/decoder_speed.py);
# 3. if DATA_DIR is set: 6 training runs in one process against the same runs one after another
#    (benchmarks/multirun.py, bf16), then the whole accuracy suite (benchmarks/accuracy.py, every phase),
#    JOBS processes at a time on the one GPU, each training up to TOGETHER prompt runs of a task over one
#    backbone, into $OUT/accuracy_gpu (its own CSVs: GPU kernels are not bit-identical to the CPU ones,
#    so its rows are not mixed with the CPU suite's), then the plateau study (benchmarks/plateau.py) on all
#    seven tasks at PLATEAU_STEPS (2000) constant-rate steps, 5 seeds of EPT and DePT, into $OUT/plateau_gpu.
# Run from anywhere in a fresh checkout on a machine with one CUDA GPU:
#
#     bash benchmarks/gpu.sh                        # installs into .venv-gpu, then runs the speed benchmarks
#     DATA_DIR=data bash benchmarks/gpu.sh          # ... and the accuracy suite on the GLUE/SuperGLUE files in data/
#     OUT=/some/dir bash benchmarks/gpu.sh          # results under $OUT instead of benchmarks/results
#     PACK=gpu-pack bash benchmarks/gpu.sh          # no network: everything from `make pack`'s folder (below)
#
# Offline (PACK=folder made by `python benchmarks/pack.py build`, <= 64 MiB): no venv and no pip download;
# the system python3 (torch, transformers, accelerate, peft) runs this checkout's src/ with the pack
# unpacked into .gpu-local (float32 backbone package, task files, wheels, an `eptkit` launcher), and
# DATA_DIR defaults to the packed task files. The accuracy suite needs datasets, whose pyarrow does not
# fit in the pack: without it the suite is skipped with a message (the speed benchmarks need neither).
#
# Environment knobs:
#   PYTHON=python3.11        interpreter used to create the venv (or to run, with PACK)
#   VENV=.venv-gpu           venv directory (created if missing)
#   USE_SYSTEM_TORCH=1       create the venv with --system-site-packages (reuse a preinstalled CUDA torch)
#   SKIP_INSTALL=1           use $VENV as it is
#   PACK=                    an offline pack folder (see above)
#   DTYPES="fp32 bf16"       which precisions to run (bf16 = torch.autocast, fp32 weights)
#   WARMUP=10 REPEATS=30     rounds per method (interleaved round-robin)
#   DATA_DIR=                folder with glue/ and super_glue/ as in ../shared/data (accuracy suite)
#   JOBS=4 THREADS=2         accuracy processes at a time, torch CPU threads per process
#   TOGETHER=6               PT/DePT/EPT runs of one task per process (eptkit.multirun)
#   SPEED=0                  skip the speed benchmarks; DECODER=0 skips the decoder-only one
#   ACCURACY=0               skip the accuracy suite even with DATA_DIR
#   FSDP=0                   skip the sharded-training smoke run (accelerate FSDP2 over every GPU)
#   MEMORY=0                 skip the memory benchmark (benchmarks/memory.py; DDP/FSDP x 2 need 2 GPUs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
DTYPES=${DTYPES:-"fp32 bf16"}
WARMUP=${WARMUP:-10}
REPEATS=${REPEATS:-30}
OUT_DIR=${OUT:-benchmarks/results}

if [ -n "${PACK:-}" ]; then
    # Offline: nothing is installed into the system; the pack goes to .gpu-local, found through the paths.
    LOCAL="$PWD/.gpu-local"
    PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/pack.py unpack "$PACK" --into "$LOCAL"
    export PYTHONPATH="$PWD/src:$LOCAL:$LOCAL/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$LOCAL/bin:$PATH"
    DATA_DIR=${DATA_DIR:-$LOCAL/data}
    PY="$PYTHON"
elif [ -z "${SKIP_INSTALL:-}" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        if [ -n "${USE_SYSTEM_TORCH:-}" ]; then
            "$PYTHON" -m venv --system-site-packages "$VENV"
        else
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    "$VENV/bin/pip" install -q --upgrade pip
    # torch==2.13.0 from PyPI is the CUDA build on Linux x86-64.
    "$VENV/bin/pip" install -q -e .
fi
PY=${PY:-"$VENV/bin/python"}

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "CUDA is not available to torch: this script needs a GPU"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF

mkdir -p "$OUT_DIR"
for DT in $( [ "${SPEED:-1}" = 0 ] || echo "$DTYPES" ); do
    NAME=speed_t5-base-shaped_cuda
    [ "$DT" = fp32 ] || NAME="${NAME}_${DT}"
    HF_HUB_OFFLINE=1 "$PY" benchmarks/speed.py --model t5-base-shaped --device cuda --dtype "$DT" \
        --warmup "$WARMUP" --repeats "$REPEATS" --out-dir "$OUT_DIR" --name "$NAME" \
        2> >(tee "$OUT_DIR/$NAME.log" >&2)
done
for DT in $( [ "${SPEED:-1}" = 0 ] || [ "${DECODER:-1}" = 0 ] || echo "$DTYPES" ); do
    NAME=decoder_speed_llama-1024x8_cuda
    [ "$DT" = fp32 ] || NAME="${NAME}_${DT}"
    HF_HUB_OFFLINE=1 "$PY" benchmarks/decoder_speed.py --shape llama-1024x8 --device cuda --dtype "$DT" \
        --warmup "$WARMUP" --repeats "$REPEATS" --out-dir "$OUT_DIR" --name "$NAME" \
        2> >(tee "$OUT_DIR/$NAME.log" >&2)
done
if [ "${FSDP:-1}" != 0 ]; then
    # Sharded training (issue 23): accelerate's FSDP2 (recipes/accelerate/fsdp.yaml) over every GPU here,
    # EPT on the bundled MiniLM over a generated 3-class file, bf16, 20 steps with a checkpoint; then the
    # adapter is scored in one plain process (whole files). Compare fsdp_smoke/run/log.jsonl's losses with
    # a DDP or one-GPU run of the same global batch to see the sharded path on real GPUs.
    FS="$OUT_DIR/fsdp_smoke"
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    mkdir -p "$FS"
    "$PY" - "$FS" <<'PYEOF'
import json, sys
rows = [{"text": f"the {w} movie number {i} was {w}", "label": w} for i, w in enumerate(["good", "bad", "fine"] * 40)]
for name, part in (("train", rows[:96]), ("val", rows[96:])):
    open(f"{sys.argv[1]}/{name}.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in part))
PYEOF
    HF_HUB_OFFLINE=1 "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml \
        --num_processes "$NGPU" -m eptkit.cli train --train-file "$FS/train.jsonl" --validation-file "$FS/val.jsonl" \
        --text-columns text --method ept --max-steps 20 --eval-steps 10 --save-steps 10 --batch-size 8 \
        --mixed-precision bf16 --overwrite --output-dir "$FS/run" 2>&1 | tee "$FS/train.log" \
        && HF_HUB_OFFLINE=1 "$PY" -m eptkit.cli evaluate --adapter "$FS/run" --split validation \
        || echo "FSDP smoke run FAILED (see $FS/train.log)" >&2
fi
if [ "${MEMORY:-1}" != 0 ]; then
    # Memory of sharded and checkpointed training (issue 23): the CPU script unchanged (nccl, one GPU per
    # process); with one GPU only the 1-process rows run (torchrun cannot place 2 processes on 2 GPUs).
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    LAYOUTS=single; [ "$NGPU" -ge 2 ] && LAYOUTS=single,ddp,fsdp
    HF_HUB_OFFLINE=1 "$PY" benchmarks/memory.py --layouts "$LAYOUTS" --steps 5 --out-dir "$OUT_DIR" \
        2> >(tee "$OUT_DIR/memory_cuda.log" >&2) || echo "memory benchmark FAILED (see $OUT_DIR/memory_cuda.log)" >&2
fi
if [ -n "${DATA_DIR:-}" ] && [ "${ACCURACY:-1}" != 0 ] && ! "$PY" -c "import datasets" 2>/dev/null; then
    echo "accuracy suite skipped: the datasets package (with pyarrow) is not importable here" >&2
elif [ -n "${DATA_DIR:-}" ] && [ "${ACCURACY:-1}" != 0 ]; then
    HF_HUB_OFFLINE=1 "$PY" benchmarks/multirun.py --k 6 --steps 200 --batch-size 16 --mixed-precision bf16 \
        --prompt-length 60 --max-length 128 --data-dir "$DATA_DIR" --output "$OUT_DIR/multirun_gpu.md"
    # The learning-rate selection runs first (it decides the final runs' rates), then final and ablations.
    HF_HUB_OFFLINE=1 "$PY" benchmarks/accuracy.py --results-dir "$OUT_DIR/accuracy_gpu" run --phase all \
        --data-dir "$DATA_DIR" --jobs "${JOBS:-4}" --threads "${THREADS:-2}" --together "${TOGETHER:-6}" \
        2>&1 | tee "$OUT_DIR/accuracy_gpu.log"
    # The plateau study (issue 20) on all seven tasks: every run long, at constant rates, so each budget is a
    # prefix; EPT and DePT at 5 seeds, PT and LoRA at 3, the ablations; then the tables and plots.
    HF_HUB_OFFLINE=1 "$PY" benchmarks/plateau.py run --phase all --tasks rte,mrpc,cb,cola,stsb,wic,sst2 \
        --steps "${PLATEAU_STEPS:-2000}" --data-dir "$DATA_DIR" --results-dir "$OUT_DIR/plateau_gpu" \
        --runs-dir "$OUT_DIR/plateau_gpu/runs" --jobs "${JOBS:-4}" --threads "${THREADS:-2}" \
        2>&1 | tee "$OUT_DIR/plateau_gpu.log"
    "$PY" benchmarks/plateau.py report --results-dir "$OUT_DIR/plateau_gpu" --runs-dir "$OUT_DIR/plateau_gpu/runs"
fi
echo "results in $OUT_DIR"
