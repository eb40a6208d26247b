#!/usr/bin/env bash
# Mixtral-8x7B-shaped multi-LoRA run on 8 GPUs (TP=2 with SP, EP=4), Megatron-LM style. Not exercised by CI
# (no GPU there; tests/test_config.py checks that its flags make a valid run). Import the base (and its
# tokenizer.json) first:
#   python tools/convert_checkpoint.py import-hf --hf-dir /models/Mixtral-8x7B-v0.1 --save /ckpt/mixtral-base
# Tenants join while the job runs: one YAML per tenant (template: examples/tenant.yaml) moved into $TENANTS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-/ckpt/mixtral-base}
SAVE=${SAVE:-/ckpt/mixtral-multilora}
TENANTS_DIR=${TENANTS_DIR:-$SAVE/incoming}
mkdir -p "$TENANTS_DIR"

DISTRIBUTED_ARGS=(--nproc-per-node 8 --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}"
                  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-6000}")
MODEL_ARGS=(--model mixtral-8x7b --load-base "$BASE" --tokenizer "$BASE")
LORA_ARGS=(--max-slots 64 --max-rank 64 --tenants-dir "$TENANTS_DIR" --tenants-dir-idle-wait 3600)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 4
                     --pipeline-model-parallel-size 1 --moe-token-dispatcher-type alltoall --distributed-backend nccl)
TRAINING_ARGS=(--micro-batch-size 4 --seq-length 4096 --train-iters 20000 --recompute-activations
               --exit-signal-handler)  # SIGTERM (preemption): finish the iteration, save, exit 0
EVAL_AND_LOGGING_ARGS=(--eval-interval 500 --eval-iters 10 --log-interval 10 --save "$SAVE" --load "$SAVE"
                       --save-interval 500 --keep-last-checkpoints 3
                       --tensorboard-dir "$SAVE/tensorboard" --metrics-file "$SAVE/metrics.jsonl")

torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_multilora.train \
    "${MODEL_ARGS[@]}" "${LORA_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
