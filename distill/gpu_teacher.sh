#!/usr/bin/env bash
# Train the Shapes teacher on one lent GPU, inside a device lease, and bring back what matters:
#
#   bash distill/gpu_teacher.sh OUTDIR [MINUTES]     # on the device: bash distill/gpu_teacher.sh "$OUT" 7
#
# Why: on the 2-core CPU the teacher gets a few thousand steps of 16 clips an hour and levels off at oracle
# adherence ~0.5 (README, "Where the teacher stands"); this measures what 10-30x the samples buy at the same size.
# Steps: render 10,000 clips in worker processes and encode them on the GPU; train with the fixed text code, bf16
# autocast, 64 clips a step, until MINUTES have passed (a checkpoint is saved when time is up); then write to
# OUTDIR the log, the teacher (fp16, in files under 16 MB) and its oracle adherence on 50 prompts.
# Every file this writes sits at most two folders below OUTDIR.
# The layout is the shipped model's (preset shapes-t2, its VAE in assets/shapes/vae). PRESET, VAE and LENGTHS pick
# another; INIT starts from a teacher instead of from scratch (e.g. INIT=assets/shapes-teacher), and GROW=N with it
# grows that teacher to N blocks first (train_teacher --grow-layers):
#   PRESET=shapes VAE=runs/vae-t4 LENGTHS="5 5 9" bash distill/gpu_teacher.sh "$OUT" 7
#   INIT=assets/shapes-teacher GROW=12 bash distill/gpu_teacher.sh "$OUT" 7
#   PRESET=shapes-t2-p2 bash distill/gpu_teacher.sh "$OUT" 7      # 2x2 patches on the shipped latents, from scratch
set -euo pipefail
PRESET=${PRESET:-shapes-t2}
VAE=${VAE:-assets/shapes/vae}
LENGTHS=${LENGTHS:-5 9 17}
INIT=${INIT:+--init $INIT}
if [[ -n "${GROW:-}" && -z "$INIT" ]]; then echo "GROW=$GROW needs INIT (the teacher to grow)" >&2; exit 2; fi
GROW=${GROW:+--grow-layers $GROW}
OUTDIR=${1:?usage: bash distill/gpu_teacher.sh OUTDIR [MINUTES]}
MINUTES=${2:-7}
RUN=runs/teacher-gpu
mkdir -p "$OUTDIR"
python -m distill.train_teacher --preset "$PRESET" --vae "$VAE" --latents "runs/latents-gpu-$PRESET.safetensors" \
    --clips 10000 --render-workers 12 --out "$RUN" --text fixed --batch-size 64 --lr 3e-4 --warmup 500 \
    --steps 1000000 --max-minutes "$MINUTES" --amp bf16 --shift 5 --latent-lengths $LENGTHS --p-context 0.3 \
    --ckpt-every 5000 --log-every 100 --quiet $INIT $GROW
cp "$RUN/log.jsonl" "$OUTDIR/teacher-gpu-log.jsonl"
python -m distill.train_teacher --preset "$PRESET" --vae "$VAE" --out "$RUN" --export "$OUTDIR/teacher-gpu" \
    --export-shard-mb 12 --eval 50 | tee "$OUTDIR/teacher-gpu-eval.txt"
python -m distill.train_teacher --preset "$PRESET" --vae "$VAE" --out "$RUN" --heldout 64 | tee "$OUTDIR/teacher-gpu-heldout.txt"
