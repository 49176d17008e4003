#!/usr/bin/env bash
# Every GPU check of this project in one command, sized for one 10-minute call on a lent H100/H200:
# the GPU tests, the throughput table of bench/gpu_throughput.py and bench/vs_peers.py on the GPU.
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

echo "== SDPA: flash attention with grouped k/v (the decoder's path)"
timeout 60 $PY - <<'PYEOF' 2>&1 | tail -3 | tee "$OUT/sdpa.txt"
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(2, 14, 4096, 64, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(2, 2, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        print(backend.name, "takes enable_gqa=True")
    except Exception as err:
        print(backend.name, "refuses enable_gqa=True:", str(err).splitlines()[0][:120])
PYEOF

echo "== GPU tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/training/test_gpu.py tests/training/test_step_ledger.py \
  tests/training/test_compile.py > "$OUT/tests.log" 2>&1
echo "tests exit code $?"; tail -4 "$OUT/tests.log"

echo "== throughput"
timeout 330 $PY bench/gpu_throughput.py --timeout 120 --json "$OUT/throughput.json" > "$OUT/throughput.log" 2>&1
echo "throughput exit code $?"

echo "== vs peers"
timeout 80 $PY bench/vs_peers.py --rounds 1 --steps 15 --warmup 5 > "$OUT/vs_peers.log" 2>&1
echo "vs_peers exit code $?"

tail -14 "$OUT/throughput.log"
tail -6 "$OUT/vs_peers.log"
