#!/usr/bin/env bash
# The GPU checks of issues 4 and 8 in one short script, for a machine with one CUDA GPU.
#
#   [STEPS="tests kernels bench bench_large profile scale train"] [TRAIN_STRATEGIES="ddp deepspeed_zero2"] [TRAIN_OVERRIDES=...] bash benchmarks/gpu_checks.sh OUTDIR [WHEELDIR]
#
# 1. the GPU-only tests (attention backends in bf16 against the fp32 reference, fused AdamW, every task end to end);
#    then every attention kernel alone on one whole-human batch's cu_seqlens (benchmarks/attention_kernels.py, ``kernels``);
# 2. benchmarks/train_step.py on the whole-human shape: the original architecture (padded
#    nn.TransformerEncoder) side by side with our sdpa / flash_attn backends, padded and packed, with the
#    compile and fused-AdamW options; then a larger batch (``bench``); a profile of the flash_attn
#    variants: device-busy against wall time per step and the top kernels (``profile``); per-device batches
#    of 128, 256 and 384 cells with fused AdamW, with and without compile, flash_attn against its variant
#    that takes the lse gradient from an extra call, the 256 one profiled (``scale``; SCALE_BATCHES,
#    SCALE_BACKENDS, SCALE_EXTRAS override);
# 3. scgpt-train on the whole-human shape, bf16, with strategy=ddp and strategy=deepspeed_zero2 on one GPU:
#    cells/s, tokens/s, TFLOP/s, MFU and peak memory from each run's summary.json.
# Each step has its own time limit and the script goes on when one fails; logs and summaries land in OUTDIR.
# WHEELDIR (optional): wheels of the project's dependencies the machine lacks, installed with --no-index.
set -u
OUT=${1:?usage: gpu_checks.sh OUTDIR [WHEELDIR]}
WHEELS=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SCGPT_CACHE=/tmp/scgpt-cache
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-tests kernels bench bench_large profile scale train} "
want() { [[ "$STEPS" == *" $1 "* ]]; }

if [ -n "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L | tee "$OUT/device.txt"
$PY - <<'EOF' | tee -a "$OUT/device.txt"
import torch
from scgpt.model.attention import flash_attn_package_available, torch_flash_varlen_available
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("flash-attn package:", flash_attn_package_available(), "torch varlen flash kernel:", torch_flash_varlen_available())
EOF

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start))s"
  tail -n 4 "$OUT/$name.log"
}

want tests && step gpu_tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/model tests/tasks
want kernels && step attention_kernels 120 $PY benchmarks/attention_kernels.py --device cuda --dtype bfloat16 \
  --backends ${KERNEL_BACKENDS:-sdpa,flash_attn,flash_attn_lse_call,flash_attn4,cudnn,flex,flex_flash} --batch-size 128 --calls 20

BENCH="$PY benchmarks/train_step.py --shapes whole_human --device cuda --dtype bfloat16"
want bench && step train_step_b32 150 $BENCH --backends sdpa,flash_attn --batch-size 32 --steps 20 --warmup 5 --extras compile,fused_adamw
want bench_large && step train_step_b128 100 $BENCH --backends flash_attn --layouts packed,packed_known_first --no-original --batch-size 128 --steps 10 --warmup 3
want profile && step profile_b32 100 $BENCH --backends flash_attn --batch-size 32 --steps 5 --warmup 3 --profile 3
want scale && for batch in ${SCALE_BATCHES:-128 256 384}; do
  profile=$([ "$batch" = 256 ] && echo "--profile 2" || echo "")
  step "train_step_scale_b$batch" 110 $BENCH --backends ${SCALE_BACKENDS:-flash_attn,flash_attn_lse_call} --layouts packed \
    --no-original --batch-size $batch --steps 8 --warmup 3 --extras ${SCALE_EXTRAS:-fused_adamw,compile+fused_adamw} $profile
done

# Cells of 300-1200 expressed genes (median ~900): the synthetic generator at 10k genes.
TRAIN=(scgpt-train trainer=gpu model=scgpt_whole_human logger=none model.attention_backend=flash_attn
       data.layout=packed data.synthetic.n_cells=30000 data.synthetic.n_genes=10000 data.num_workers=8 data.block_size=128
       data.global_batch_size=128 data.per_device_batch_size=128 trainer.max_steps=150 task.module.fused_adamw=true
       trainer.val_check_interval=100000 trainer.enable_progress_bar=false checkpoint.every_n_train_steps=100000)
want train && for strategy in ${TRAIN_STRATEGIES:-ddp deepspeed_zero2}; do
  step "train_$strategy" 120 $PY -m scgpt.train "${TRAIN[@]:1}" strategy=$strategy "hydra.run.dir=/tmp/runs/$strategy" ${TRAIN_OVERRIDES:-}
  cp "/tmp/runs/$strategy/summary.json" "$OUT/summary_$strategy.json" 2>/dev/null
done
echo "== done"
