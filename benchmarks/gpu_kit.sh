#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_session.sh needs on a lent GPU machine, which has
# PyTorch, transformers and most of our dependencies but no network: `.whl/` (wheels for its
# Python 3.12 of the packages it lacks, at the versions this checkout's .venv holds) and
# `.gpu-assets/assets/tiny-lm` (the offline tiny-LM assets, built here first if missing).
# Both are git-ignored: name them in the device call's `carry`. Ray is not among them: its wheel
# (79 MB) alone is over the 64 MiB a device call can carry, so the session checks what runs
# without Ray (see README, "Checks on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
# The packages the device image lacks, and what they need that it lacks too.
NEED='pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|datasets|dill|multiprocess'
mapfile -t pins < <("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE "^($NEED)==")
if [ "${#pins[@]}" -ne 7 ]; then
    echo "gpu_kit: expected 7 pinned packages in $PY's environment, found: ${pins[*]}" >&2
    exit 1
fi
rm -rf .whl.tmp && mkdir .whl.tmp
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl.tmp "${pins[@]}"
rm -rf .whl && mv .whl.tmp .whl
# The tiny-LM assets as `spd-ray make-tiny-lm` leaves them under the output root.
root=${SPD_RAY_OUT:-$HOME/spd_ray_out}
"$PY" -m spd_ray.cli make-tiny-lm "$root/assets/tiny-lm" >/dev/null  # a no-op when complete
rm -rf .gpu-assets.tmp && mkdir -p .gpu-assets.tmp/assets
cp -r "$root/assets/tiny-lm" .gpu-assets.tmp/assets/
rm -rf .gpu-assets && mv .gpu-assets.tmp .gpu-assets
du -sh .whl .gpu-assets
