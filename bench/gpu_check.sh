#!/usr/bin/env bash
# One session on a lent GPU machine: the CUDA-marked tests, then the learning benchmark's recipe
# on code-outline with the GPU's steps. The machine has torch but not our other dependencies:
# they travel as wheels in .whl/ (pip download on a machine with an index), the corpus as data/.
#   device run, carry [".whl", "data/code-outline"]: bash bench/gpu_check.sh
set -u
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, xformers; print('torch', torch.__version__, 'xformers', xformers.__version__)"
timeout "${TESTS_S:-210}" python3 -m pytest -q -rs -m cuda -p no:cacheprovider \
    tests/test_cuda.py tests/test_attention.py 2>&1 | tee "$out/cuda_tests.log"
timeout "${LEARN_S:-330}" python3 -m bench.learn --tasks code-outline --ablations \
    --minutes "${LEARN_MIN:-3}" --batch_size 64 --accelerator gpu \
    --out "$out/learn_gpu.json" 2>&1 | tee "$out/learn_gpu.log"
