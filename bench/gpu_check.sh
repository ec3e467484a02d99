#!/usr/bin/env bash
# Issue #7's GPU checks in one call of the device tool: the CUDA tests, the bfloat16 matmul peak, and the
# Qwen2-0.5B-shaped cases of the issue (8 prompts x 8 samples, 64-token prompts, 256-token completions,
# bfloat16 weights and autocast on both sides) against TRL and transformers `generate`, on one GPU.
#
# Here, once (pip reaches the package registry; the device machine reaches nothing):
#     bash bench/gpu_check.sh fetch        # wheels for the device's Python 3.12 into .whl/ (git-ignored)
#     WITH_PYARROW=1 bash bench/gpu_check.sh fetch   # also pyarrow (55 MB), if the device's is older than 24
# There, through the device tool's `run` with carry [".whl"] and a timeout of 600 s:
#     bash bench/gpu_check.sh run
# Every case writes its own JSON under $OUT as it ends, and the whole output goes to $OUT/log.txt, so a run cut
# short still returns what it finished. Not part of CI, not part of `make bench` (which is the CPU's).
set -euo pipefail
cd "$(dirname "$0")/.."

# what the device image lacks (../.library/device/KINDS.md lists what it has: torch, transformers, accelerate,
# peft, pandas, ...), pinned to the versions the CPU runs use
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.12.5 pydantic_core==2.41.5
        annotated-types==0.8.0 typing-inspection==0.4.5)
GPU_CASE=(--device cuda --sizes 0.5b --rounds 1 --threads 8)

case "${1:-}" in
fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${WHEELS[@]}" ${WITH_PYARROW:+pyarrow==26.0.1}
    du -sh .whl
    ;;
run)
    : "${OUT:?run this on the device machine, where the device tool sets OUT}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch, transformers, trl, datasets, pyarrow, posttrain
print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__,
      '| datasets', datasets.__version__, '| pyarrow', pyarrow.__version__, '| gpu', torch.cuda.get_device_name())"
        python3 -m pytest -q -p no:cacheprovider tests/rollout/test_decoders.py tests/policies -k "cuda or bf16" || true
        python3 bench/matmul_peak.py "${GPU_CASE[@]}" --json "$OUT/matmul_peak.json"
        python3 bench/generation.py "${GPU_CASE[@]}" --prompt-tokens 64 --completion 256 --json "$OUT/generation.json"
        POSTTRAIN_CUDA_GRAPHS=1 python3 bench/generation.py "${GPU_CASE[@]}" --prompt-tokens 64 --completion 256 \
            --json "$OUT/generation_graphs.json"
        # TRL on its default path (gradient checkpointing, as the issue measured it: 8.5 s, 33 GB); posttrain in two
        # micro-batches of 32 sequences, so that its kept activations (bench/activation_memory.py: 13.9 GiB for the
        # whole step) stay under half of that; TRL gets the same micro-batches
        python3 bench/grpo_step.py "${GPU_CASE[@]}" --prompt-tokens 64 --completion 256 --micro-batch 32 \
            --json "$OUT/grpo_step.json"
        python3 bench/dpo_step.py "${GPU_CASE[@]}" --references default --json "$OUT/dpo_step.json"
    } 2>&1 | tee "$OUT/log.txt"
    ;;
*)
    echo "usage: bash bench/gpu_check.sh fetch|run (see the comments at the top)" >&2
    exit 2
    ;;
esac
