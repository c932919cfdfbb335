#!/usr/bin/env bash
# One lease of the lent GPU (issue 15): eager against compiled decoding for vanilla and every method on
# LLaVA-1.5-7B and Qwen2.5-VL-7B shapes (random weights, float16), batch 1 and 8, two interleaved rounds
# per configuration, and `veridical eval pope` throughput eager and with --compile: one table, $OUT/gpu.md,
# written row by row as each item is measured (benchmarks/overhead.py --plan; POPE: benchmarks/pope_gpu.py).
#
#   bash benchmarks/gpu.sh                 # the GPU machine, from the repository root, $OUT set
#   GPU_SMOKE=1 bash benchmarks/gpu.sh     # CPU dry run: tiny models, 2 tokens, dynamo's eager backend
#
# The machine's python3 has torch and transformers 5.17: transformers 5.24.0 comes as a wheel in .whl/
# (carry it: run(carry=[".whl"])), installed into a scratch folder and put first on PYTHONPATH with this
# checkout; nothing is installed system-wide and nothing is downloaded.
#
# Settings (environment): GPU_BUDGET_S  seconds for the whole script (default 450): items run in order of
#   importance, one that does not fit runs eager only or is skipped and listed; an alarm stops an overrun,
#   and `timeout` kills python 20 s after the deadline whatever it is doing;
#   GPU_PLAN  comma-separated items (default: overhead.py's default_plan), e.g.
#   "llava-1.5-7b:1:vanilla,llava-1.5-7b:1:vcd:compiled,pope:llava-1.5-7b";
#   GPU_TOKENS  new tokens per call (32; smoke 2);  GPU_COMPILE_CACHE  a compile_cache.bin from an earlier
#   run ($OUT/compile_cache.bin, carried back), loaded first so that compilation is mostly cache hits.
set -euo pipefail

START=$(date +%s)
cd "$(dirname "$0")/.."
SMOKE=${GPU_SMOKE:-0}
fail() { echo "benchmarks/gpu.sh: error: $*" >&2; exit 1; }

if [[ "$SMOKE" == 1 ]]; then
    OUT=${OUT:-$(mktemp -d /tmp/veridical-gpu-smoke.XXXXXX)}
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    BUDGET=${GPU_BUDGET_S:-3600}
    TOKENS=${GPU_TOKENS:-2}
    EXTRA=(--smoke --compile-backend eager --threads 2 --pope-questions 16 --pope-batch 4 --pope-tokens 2)
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    [[ -n "${OUT:-}" ]] || fail "OUT is not set (the folder whose files come back from the machine)"
    PY=${PYTHON:-python3}
    BUDGET=${GPU_BUDGET_S:-450}
    TOKENS=${GPU_TOKENS:-32}
    EXTRA=(--threads 8)
    shopt -s nullglob
    WHEELS=(.whl/transformers-*.whl)
    shopt -u nullglob
    [[ ${#WHEELS[@]} == 1 ]] || fail "expected one .whl/transformers-*.whl, found ${#WHEELS[@]}: download it \
here with 'python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
--platform manylinux2014_x86_64 -d .whl transformers==5.24.0' and pass carry=[\".whl\"]"
    SITE=$(mktemp -d /tmp/veridical-site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${WHEELS[0]}" \
        || fail "pip could not install ${WHEELS[0]} into $SITE"
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    WANT=$(basename "${WHEELS[0]}" | cut -d- -f2)
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DEADLINE=$((START + BUDGET))

"$PY" - "$SMOKE" "${WANT:-}" <<'EOF' || fail "the preflight check failed (above)"
import sys

import torch
import transformers

import veridical

smoke, want = sys.argv[1] == "1", sys.argv[2]
print(f"torch {torch.__version__}, transformers {transformers.__version__} ({transformers.__file__}), "
      f"veridical from {veridical.__file__}")
if want and transformers.__version__ != want:
    sys.exit(f"transformers {transformers.__version__} imported, the wheel is {want}: PYTHONPATH is not first")
if not smoke and not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible (torch.cuda.is_available() is False); on a CPU use GPU_SMOKE=1")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.get_device_name()}: {free / 2**30:.0f} of {total / 2**30:.0f} GiB free")
EOF

ARGS=(--plan "${GPU_PLAN:-default}" --out-dir "$OUT" --deadline "$DEADLINE" --tokens "$TOKENS" "${EXTRA[@]}")
if [[ -n "${GPU_COMPILE_CACHE:-}" ]]; then ARGS+=(--compile-cache "$GPU_COMPILE_CACHE"); fi
if [[ -n "${GPU_MARGIN_S:-}" ]]; then ARGS+=(--margin-s "$GPU_MARGIN_S"); fi  # to test the kill path
echo "gpu.sh: $(( $(date +%s) - START )) s of setup; deadline in $(( DEADLINE - $(date +%s) )) s; OUT=$OUT"

set +e
timeout --signal=TERM --kill-after=5 $(( DEADLINE - $(date +%s) + 20 )) \
    "$PY" benchmarks/overhead.py "${ARGS[@]}" 2>&1 | tee "$OUT/gpu.log"
RC=${PIPESTATUS[0]}
set -e
if [[ $RC == 124 || $RC == 137 ]]; then
    printf '\n**Killed at the deadline** (exit %s) while: %s\n' "$RC" "$(cat "$OUT/progress.txt" 2>/dev/null || echo '?')" \
        | tee -a "$OUT/gpu.md"
elif [[ $RC != 0 ]]; then
    { printf '\n**overhead.py failed** (exit %s); the last lines of gpu.log:\n\n```\n' "$RC"
      grep -v '^\s*$' "$OUT/gpu.log" | tail -n 15
      printf '```\n'; } | tee -a "$OUT/gpu.md"
fi
printf '\ngpu.sh: %s s in all (budget %s s).\n' "$(( $(date +%s) - START ))" "$BUDGET" | tee -a "$OUT/gpu.md"
echo "==================== $OUT/gpu.md ===================="
cat "$OUT/gpu.md"
exit "$RC"
