#!/usr/bin/env bash
# Issue #16's GPU measurements as one device call (GPU time is short: every step has its own time limit and
# writes its JSON as it goes). Run from the repository root on a machine with CUDA, PyTorch, transformers,
# PEFT and Lightning; wheels for the other packages (datasets, dill, multiprocess) may lie in .whl/.
#
#     OUT=benchmarks/results bash benchmarks/gpu_session.sh
#
# The package is installed (not editable) into /tmp/site and the benchmarks run from a copy, so that the
# repository's own guardspace_pl/ folder does not shadow the installed namespace (guardspace_pl.callbacks).
set -u
OUT=${OUT:-benchmarks/results}
OUT=$(realpath "$OUT")
LAYERS=${LAYERS:-4}  # decoder layers of the Llama-2-7B-shaped model in the end-to-end run (set-up scales linearly)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .whl/*.whl . || exit 1
rm -rf /tmp/bench && mkdir -p /tmp/bench && cp -r benchmarks /tmp/bench/ && cd /tmp/bench || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_machine.txt"
python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu_machine.txt"
# 1. set-up and step overhead at Llama-2-7B shapes (bf16, r = 128 on all seven projections, 520 prompts)
timeout "${SETUP_TIMEOUT:-300}" python3 -m benchmarks.llama7b_gpu --profile llama7b --layers "$LAYERS" --steps "${STEPS:-10}" \
    --out "$OUT/llama7b_gpu_llama7b_gpu.json" 2>&1 | tee "$OUT/llama7b_gpu.log"
# 2. decomposition solvers at the real shapes (4096 x 4096, 11008 x 4096, 4096 x 11008), one layer timed
[ "${SOLVER_TIMEOUT:-220}" = 0 ] || timeout "${SOLVER_TIMEOUT:-220}" python3 -m benchmarks.decomposition --profile llama7b --device cuda --mode extrapolate \
    --measure-layers 1 --solvers svd64 svd32 gram_eigh64 svd64_gesvd svd32_gesvdj --solver-repeats 2 \
    --out "$OUT/decomposition_llama7b_gpu.json" 2>&1 | tee "$OUT/decomposition_gpu.log"
