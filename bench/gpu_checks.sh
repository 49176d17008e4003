#!/usr/bin/env bash
# Every GPU check of this project in one command, sized for one call of about 6 minutes on a lent
# H100/H200: the GPU tests, bench/gpu_throughput.py (the recipe's table, then Qwen2.5's own
# 151,936-token vocabulary) and bench/vs_peers.py on the GPU.
# Runs from a plain checkout with the machine's own torch (no install): PYTHONPATH points at src/.
# Logs go to $OUT (default /tmp/gpu_checks); the tables are printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/bench" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
$PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"

echo "== GPU tests"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/training/test_gpu.py tests/training/test_step_ledger.py \
  tests/training/test_compile.py > "$OUT/tests.log" 2>&1
echo "tests exit code $?"; tail -2 "$OUT/tests.log"

echo "== throughput: the recipe as shipped"
timeout 190 $PY bench/gpu_throughput.py --timeout 90 --json "$OUT/throughput.json" > "$OUT/throughput.log" 2>&1
echo "exit code $?"
echo "== throughput: Qwen2.5's vocabulary"
timeout 85 $PY bench/gpu_throughput.py --compile on --mbs 2 8 --vocab-size 151936 --timeout 80 \
  > "$OUT/throughput_vocab.log" 2>&1
echo "exit code $?"

echo "== vs peers"
timeout 150 $PY bench/vs_peers.py --rounds 3 --steps 15 --warmup 5 > "$OUT/vs_peers.log" 2>&1
echo "exit code $?"

tail -13 "$OUT/throughput.log"
tail -5 "$OUT/throughput_vocab.log"
tail -6 "$OUT/vs_peers.log"
