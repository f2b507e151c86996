#!/usr/bin/env bash
# Fetch, here (with PyPI), the wheels the lent GPU machine lacks, for benchmarks/gpu_check.sh to install there.
# That machine has no network; its image holds torch, numpy, scipy, scikit-learn, matplotlib, typer, rich,
# tensorboard, pytest and pytest-timeout (the device tool's KINDS.md) on Python 3.12, x86-64.
# Usage, in the repository root: bash benchmarks/gpu_wheels.sh   (then carry .whl in the device call)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf .whl && mkdir .whl
# optimlab's runtime needs (SQLAlchemy, Optuna and theirs) and the test extras' reference packages, at the
# versions of this checkout's .venv where it has them (the versions the suite passes with here).
version() {  # NAME -> NAME==VERSION from .venv, or NAME
    local v
    v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) && echo "$1==$v" || echo "$1"
}
COMPILED=(SQLAlchemy greenlet PyYAML)
PURE=(typing-extensions optuna alembic Mako colorlog tqdm packaging lion-pytorch schedulefree expecttest prodigyopt
      dadaptation pytorch-optimizer)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $(for p in "${COMPILED[@]}"; do version "$p"; done)
# Pure-Python packages as wheels built here (some, like dadaptation, publish only a source archive).
python3 -m pip wheel -q --no-deps -w .whl $(for p in "${PURE[@]}"; do version "$p"; done)
ls .whl
du -sh .whl
