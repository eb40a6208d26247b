#!/usr/bin/env bash
# The embedded default: four tenants (different tasks, ranks, schedules) train together on the tiny MoE preset,
# 2 CPU processes (expert parallel = 2), gloo. Sets up .venv, writes demo data, trains, prints where logs are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python tools/make_demo_data.py --out demo_data >/dev/null
OUT=${OUT:-runs/demo}
# A fresh demo replaces $OUT; a resume keeps it (e.g. `bash examples/run_demo_cpu.sh --load runs/demo/checkpoints
# --train-iters 300`: the checkpoints it loads, the metrics it appends to).
case " $* " in
    *" --load "* | *" --load="*) ;;
    *) rm -rf "$OUT" ;;
esac

DISTRIBUTED_ARGS=(--standalone --nproc-per-node 2)  # standalone: a free local port, picked at run time
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 2)
TRAINING_ARGS=(--config configs/demo.yaml --micro-batch-size 4 --seq-length 64 --train-iters "${TRAIN_ITERS:-150}")
EVAL_AND_LOGGING_ARGS=(--eval-interval 50 --eval-iters 2 --log-interval 10
                       --tensorboard-dir "$OUT/tensorboard" --metrics-file "$OUT/metrics.jsonl" --save "$OUT/checkpoints")

OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore .venv/bin/torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_multilora.train \
    "${MODEL_PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
