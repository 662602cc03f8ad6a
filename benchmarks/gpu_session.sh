#!/usr/bin/env bash
# The open GPU measurements, as one prepared call of under 10 minutes for a lent machine:
#
#   bash benchmarks/gpu_session.sh OUTDIR GIT_SHA
#
# As one device call (carry [".whl"], timeout_s 590; SHA the commit sent):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_session.sh "$OUT" SHA
#
# A session is lent 15 device-minutes at most, a call 10, and a fresh machine takes a minute or two to start, so what
# is still unmeasured goes into one call, the most telling first, each step under its own time limit (a step that
# runs out is cut off and the next one starts; the log says so):
#   1. graphs   (issue 8)  CUDA-graph replay against eager on the same seed: `replay_vs_eager.max_abs_diff` should be
#                          bf16 rounding (the fix that keeps the captured timestep alive is verified only on the CPU)
#   2. preview  (issue 7)  the compiled engine with the compiled VAE decoder (its raised recompile limit is unverified)
#                          and with the preview decoder instead, the likeliest way past 30 frames/s with decode
#                          (compiled, without decode: 40.5 on an H200)
#   3. kernels  (issue 6)  block-sparse attention and the linear memory against SDPA at Wan2.1-1.3B shapes, with the
#                          launch-setting sweep (measured on an H200 so far; issue 6 names the H100)
# OUTDIR gets at most 5 files (a lease brings back 8): env.txt (device and versions), log.txt (every step's output,
# its wall time and exit status) and each step's JSON. The device's Python lacks diffusers: carry `.whl` (README, "On a
# GPU") and install it before this script. DRY=1 runs the same steps on a CPU at toy sizes (checks the script, times
# nothing), e.g.  DRY=1 bash benchmarks/gpu_session.sh /tmp/dry HEAD
set -uo pipefail
OUTDIR=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR GIT_SHA}
SHA=${2:?usage: bash benchmarks/gpu_session.sh OUTDIR GIT_SHA}
PY=${PYTHON:-python3}  # the device image's python3 is the one with PyTorch
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
: > "$LOG"
if [[ -n "${DRY:-}" ]]; then
    GPU=(--dry-run --seconds 1)
    KERNELS=(--dry-run)
    LIMITS=(300 300 300)
else
    GPU=()
    KERNELS=(--frames 9 21 --sweep)
    LIMITS=(150 260 120)
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, diffusers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" 2>&1
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
    echo "git $SHA"
} > "$OUTDIR/env.txt"

step() {  # step NAME LIMIT_S command...: run it under `timeout`, appending its output, wall time and status to the log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*" >> "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc$([[ $rc == 124 ]] && echo ' (cut off at its limit)') after $((SECONDS - t0)) s" >> "$LOG"
}

step graphs "${LIMITS[0]}" "$PY" -m benchmarks.gpu "${GPU[@]}" --systems engine graphs --decode-variants none \
    --json "$OUTDIR/gpu-graphs.json" --git-sha "$SHA"
step preview "${LIMITS[1]}" "$PY" -m benchmarks.gpu "${GPU[@]}" --systems compile+vae compile+preview \
    --decode-variants none --json "$OUTDIR/gpu-preview.json" --git-sha "$SHA"
step kernels "${LIMITS[2]}" "$PY" -m benchmarks.kernels_bench "${KERNELS[@]}" --json "$OUTDIR/kernels.json" \
    --git-sha "$SHA"
grep "^== " "$LOG"
