#!/usr/bin/env bash
# The checks that need a GPU, for a machine that has one (mpbench installed, e.g. `pip install -e ".[test]"`):
# the CUDA tests (skipped elsewhere) and MetaPerturb's step-time ratio on the device. About 3 minutes on one GPU.
set -euo pipefail
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -rs -k "cuda or gpu" tests/
python -m mpbench.cli bench metaperturb --device cuda --impl fast --impl reference --steps 30
python -m mpbench.cli bench metaperturb --device cuda --impl fast --model wrn_28_2 --steps 30
