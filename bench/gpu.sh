#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, prepared as commands of under ten minutes each on one
# H100/H200 (a lent device's limit for one call):
#
#   bench/gpu.sh train      # baseline vs engine vs engine-cached, Llama-architecture 8B, seq 2048, r 16
#   bench/gpu.sh estimate   # estimate_peak_memory against measured peaks, 1B and 8B, several shapes
#   bench/gpu.sh estimate-1b  # its 1B cases alone (~3 min, building the 1B model): for a short budget
#   bench/gpu.sh memory     # long context: Llama 3.1 8B's shape at 16k tokens, the standard recipe (what
#                           # the issue's 0.4x target is against) and the engine with neither, either and
#                           # both of activation offload and tiled MLPs; at 32k with both, and with
#                           # neither (~33 GiB: on a 24 GiB card its row says OOM). Builds the 4-bit 8B
#                           # base (~30 s), then 7 runs of 4 steps (~1 min each): ~8 min on an H200,
#                           # the rows that matter most first (bench/estimate_bench.py's LONG).
#   bench/gpu.sh paper      # the QLoRA paper's recipe (r 64, alpha 16, micro-batch 1, 512 tokens) on its
#                           # LLaMA 1 33B and 65B shapes: random weights built straight in 4 bits, layer
#                           # by layer (16 and 32 GiB on disk; 65B in bf16, 130 GB, fits neither the
#                           # host's memory nor its disk). Per model: build ~1-2 min (mostly writing),
#                           # load ~1 min, 4 steps; the 33B model is deleted before the 65B one is built
#                           # (a lent device has 64 GiB of disk). ~8 min on an H200.
#
# `estimate` reuses the 8B model `train` left in $WORK when both run on the same machine; a lent device
# is handed back between calls and starts bare, so there each mode builds what it needs: with about 15
# minutes of device time a session, one of memory, paper or estimate-1b per session (train with
# STEPS=10, its default, fits one call too). Each estimate-family mode ends with the allowance fit
# (CONTEXT_BYTES, FRAGMENTATION for worker/training/estimate.py) over the estimate reports in $OUT, in
# $OUT/allowance_fit.txt. A lent device starts each call with an empty $OUT: fit over several calls'
# reports where they came back, with `bench/estimate_bench.py --fit FILE...` (no GPU needed).
#
# On a GPU host after `make install` it runs as is. On a machine with torch but not the rest
# (a lent device), first `bench/gpu.sh wheels` where pip reaches PyPI: it downloads the pinned
# packages that machine lacks into .whl/ (git-ignored; the device tool's `carry` takes it there),
# which this script installs before running.
# Results (JSON, logs, nvidia-smi, versions) go to $OUT, default bench/results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-bench/results}
WORK=${WORK:-/tmp/qlora-gpu-bench}
STEPS=${STEPS:-10}  # 3 paths of an 8B at 2048 tokens: more steps do not fit one 10-minute call with the model built
# The engine's training.packing: "auto" is its default (on only with flash-attn); "on" measures
# padding-free packing through SDPA's block masks where no flash-attn wheel is installed.
PACKING=${PACKING:-auto}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

pin() { "$PY" -c "import re,tomllib; d=tomllib.load(open('pyproject.toml','rb'))['project']; \
print(next(r for r in d['dependencies']+d['optional-dependencies']['gpu'] if re.match(r'$1\b', r)))"; }

case "${1:-}" in
wheels)
    # What the lent device lacks or holds at another version (its package list: the device tool's
    # KINDS.md); its Python is 3.12. bitsandbytes alone is ~43 MB of the 64 MB a call may carry.
    rm -rf .whl && mkdir .whl
    for spec in "$(pin bitsandbytes)" "$(pin trl)" "$(pin peft)" "$(pin datasets)" "$(pin liger-kernel)" \
                "$(pin transformers)" dill==0.4.1 multiprocess==0.70.19 \
                pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .whl "$spec"
    done
    du -sh .whl
    exit 0 ;;
train|estimate|estimate-1b|memory|paper) ;;
*) sed -n '2,/^set -e/p' "$0" | grep '^#'; exit 2 ;;
esac

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
# Fail in seconds, not minutes into a run, when the stack does not import together (on the lent
# device: datasets 5.2 needs pyarrow >= 24; with an older pyarrow there, carry datasets==5.0.0).
"$PY" -c "import torch, transformers, peft, trl, bitsandbytes, datasets, worker.training.recipe; \
assert torch.cuda.is_available(), 'no CUDA device'; print('stack imports; GPU:', torch.cuda.get_device_name())"
"$PY" - > "$OUT/versions.json" <<'PY'
import importlib.metadata as m, json
names = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "liger-kernel", "flash-attn"]
versions = {}
for name in names:
    try:
        versions[name] = m.version(name)
    except m.PackageNotFoundError:
        versions[name] = None
print(json.dumps(versions, indent=2))
PY

case "$1" in
train)
    "$PY" bench/train_bench.py --preset 8b --device cuda --seq 2048 --batch 4 --steps "$STEPS" --packing "$PACKING" \
        --work "$WORK" --out "$OUT/train_bench_8b.json" 2>&1 | tee "$OUT/train_bench_8b.log"
    exit 0 ;;
estimate|estimate-1b)
    "$PY" bench/estimate_bench.py --device cuda --cases "$1" --work "$WORK" --out "$OUT/estimate_bench.json" 2>&1 \
        | tee "$OUT/estimate_bench.log" ;;
memory)
    "$PY" bench/estimate_bench.py --device cuda --cases memory --work "$WORK" --out "$OUT/estimate_memory.json" 2>&1 \
        | tee "$OUT/estimate_memory.log" ;;
paper)
    "$PY" bench/estimate_bench.py --device cuda --cases paper --free-disk --work "$WORK" \
        --out "$OUT/estimate_paper.json" 2>&1 | tee "$OUT/estimate_paper.log" ;;
esac
# The allowance fitted over the estimate reports in $OUT (this call's, and earlier calls' where $OUT is kept).
"$PY" bench/estimate_bench.py --fit $(ls "$OUT"/estimate_bench.json "$OUT"/estimate_memory.json \
    "$OUT"/estimate_paper.json 2>/dev/null) | tee "$OUT/allowance_fit.txt"
