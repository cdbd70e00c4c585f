#!/usr/bin/env bash
# Every check that needs a GPU, in one command on a lent GPU machine (README, "Checks on a GPU"):
# prepare here with `make gpu-kit`, then call the device tool with
#     command: bash benchmarks/gpu_session.sh     carry: [".whl", ".gpu-assets"]     timeout_s: 540
# It installs the carried wheels, runs tests/gpu (counter noise bits, compiled bf16 step, no host
# sync between logs, clustering merge) and `spd-ray bench --gpu` (one round: a lease is ~15 min) on
# tiny_llama, tiny_llama_1L, a random-weight GPT-2 small and resid_mlp3 (to size its ground-truth
# run). Writes nvidia-smi.txt, tests.log, bench.log and results.jsonl to $OUT.
# BENCH_FLAGS (default "--gpu --memory --rounds 1 --steps 30"), BENCH_SET (extra --set arguments,
# applied to every experiment) and BENCH_EXPERIMENTS (comma-separated) change the bench;
# `BENCH_FLAGS=--memory PY=.venv/bin/python` dry-runs it on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/spd-ray-gpu-session}
PY=${PY:-python3}
mkdir -p "$OUT"
# The carried wheels, where this Python lacks them (a checkout's .venv has them all).
if [ -d .whl ] && ! "$PY" -c "import pydantic, datasets" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/spd-ray-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/spd-ray-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .gpu-assets ] && export SPD_RAY_OUT=$PWD/.gpu-assets
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
status=0
{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } \
    > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -m pytest -q --noconftest -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests.log" || status=1
"$PY" - <<'PYEOF' || status=1
import os
import shutil
import torch
from transformers import GPT2Config, GPT2LMHeadModel
path = "/tmp/spd-ray-gpt2-small"
if not os.path.exists(path):  # saved beside it, then renamed: a killed save leaves no half model
    torch.manual_seed(0)
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path + ".tmp")  # 124M parameters, random
    os.rename(path + ".tmp", path)
PYEOF
read -r -a flags <<< "${BENCH_FLAGS:---gpu --memory --rounds 1 --steps 30}"
read -r -a sets <<< "${BENCH_SET:-}"
"$PY" -m spd_ray.cli bench "${flags[@]}" "${sets[@]}" --results "$OUT/results.jsonl" \
    --experiments "${BENCH_EXPERIMENTS:-tiny_llama,tiny_llama_1L,benchmarks/gpu/gpt2_small.yaml,resid_mlp3}" 2>&1 \
    | tee "$OUT/bench.log" || status=1
exit $status
