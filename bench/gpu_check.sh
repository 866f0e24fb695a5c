#!/usr/bin/env bash
# The one prepared GPU check (issue 7), sized to finish within 8 minutes on an H200: kernels against the torch
# reference at P = 1000 (digits and 3x32x32), the recipe (augmentation, smoothing, Nesterov and AdamW grid updates),
# a CUDA graph against eager steps, then a full training step timed for fastpop-triton, fastpop-torch, torch.func
# vmap and a module loop, with matmul and copy ceilings measured in the same run, and triton's steps under each
# recipe against plain SGD. The log lands in $OUT (the device tool's folder) when set, else in bench/.
#   bash bench/gpu_check.sh            # on a CUDA machine
#   bash bench/gpu_check.sh --small    # the CPU part, under the Triton interpreter (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import fastpop" 2>/dev/null; then
  python -m pip install -q --no-deps -e .  # torch, triton and numpy come with the machine
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
export PYTHONUNBUFFERED=1
python bench/gpu_check.py "$@" 2>&1 | tee "${OUT:-bench}/gpu_check.log"
