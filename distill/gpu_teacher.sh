#!/usr/bin/env bash
# Train the Shapes teacher on one lent GPU, inside a device lease, and bring back what matters:
#
#   bash distill/gpu_teacher.sh OUTDIR [MINUTES]     # on the device: bash distill/gpu_teacher.sh "$OUT" 7
#
# Why: on the 2-core CPU the teacher gets a few thousand steps of 16 clips an hour and levels off at oracle
# adherence ~0.5 (README, "Where the teacher stands"); this measures what 10-30x the samples buy at the same size.
# Steps: render 10,000 clips in worker processes and encode them on the GPU; train with the fixed text code, bf16
# autocast, 64 clips a step, until MINUTES have passed (a checkpoint is saved when time is up); then write to
# OUTDIR the log, the teacher (fp16, in files under 16 MB), its oracle adherence on 50 prompts, the same given each
# clip's first latent frame (--context 1: how well it continues a clip, motion words included) and its held-out loss.
# Every file this writes sits at most two folders below OUTDIR.
# The layout is the shipped model's (preset shapes-t2, its VAE in assets/shapes/vae). PRESET, VAE and LENGTHS pick
# another; INIT starts from a teacher instead of from scratch (e.g. INIT=assets/shapes-teacher), and GROW=N with it
# grows that teacher to N blocks first (train_teacher --grow-layers):
#   PRESET=shapes VAE=runs/vae-t4 LENGTHS="5 5 9" bash distill/gpu_teacher.sh "$OUT" 7
#   INIT=assets/shapes-teacher GROW=12 bash distill/gpu_teacher.sh "$OUT" 7
#   PRESET=shapes-t2-p2 bash distill/gpu_teacher.sh "$OUT" 7      # 2x2 patches on the shipped latents, from scratch
# NAME names the run folder (runs/NAME) and the files in OUTDIR (NAME-log.jsonl, NAME/, NAME-eval.txt,
# NAME-context.txt, NAME-heldout.txt), so two runs can share a lease and a GPU: the 4x4- against the 2x2-patch
# teacher, both from scratch on the same clips (README, "What the teacher gets wrong"):
#   PRESET=shapes-t2 NAME=teacher-p4 bash distill/gpu_teacher.sh "$OUT" 5 &
#   PRESET=shapes-t2-p2 NAME=teacher-p2 bash distill/gpu_teacher.sh "$OUT" 5; wait
# CLIPS, BATCH, AMP, WORKERS, EVAL (prompts) and HELDOUT (clips) shrink it for a dry run on a CPU, e.g.
#   CLIPS=8 BATCH=2 AMP=none WORKERS=0 EVAL=2 HELDOUT=2 bash distill/gpu_teacher.sh /tmp/dry 0.1
set -euo pipefail
PRESET=${PRESET:-shapes-t2}
NAME=${NAME:-teacher-gpu}
CLIPS=${CLIPS:-10000}
BATCH=${BATCH:-64}
AMP=${AMP:-bf16}
WORKERS=${WORKERS:-12}
EVAL=${EVAL:-50}
HELDOUT=${HELDOUT:-64}
VAE=${VAE:-assets/shapes/vae}
LENGTHS=${LENGTHS:-5 9 17}
INIT=${INIT:+--init $INIT}
if [[ -n "${GROW:-}" && -z "$INIT" ]]; then echo "GROW=$GROW needs INIT (the teacher to grow)" >&2; exit 2; fi
GROW=${GROW:+--grow-layers $GROW}
OUTDIR=${1:?usage: bash distill/gpu_teacher.sh OUTDIR [MINUTES]}
MINUTES=${2:-7}
RUN=runs/$NAME
mkdir -p "$OUTDIR"
python -m distill.train_teacher --preset "$PRESET" --vae "$VAE" --latents "runs/latents-gpu-$PRESET-$CLIPS.safetensors" \
    --clips "$CLIPS" --render-workers "$WORKERS" --out "$RUN" --text fixed --batch-size "$BATCH" --lr 3e-4 \
    --warmup 500 --steps 1000000 --max-minutes "$MINUTES" --amp "$AMP" --shift 5 --latent-lengths $LENGTHS \
    --p-context 0.3 --ckpt-every 5000 --log-every 100 --quiet $INIT $GROW
cp "$RUN/log.jsonl" "$OUTDIR/$NAME-log.jsonl"
python -m distill.train_teacher --preset "$PRESET" --vae "$VAE" --out "$RUN" --export "$OUTDIR/$NAME" \
    --export-shard-mb 12 --eval "$EVAL" | tee "$OUTDIR/$NAME-eval.txt"
python -m distill.train_teacher --preset "$PRESET" --vae "$VAE" --out "$RUN" --eval "$EVAL" --context 1 \
    | tee "$OUTDIR/$NAME-context.txt"
python -m distill.train_teacher --preset "$PRESET" --vae "$VAE" --out "$RUN" --heldout "$HELDOUT" \
    | tee "$OUTDIR/$NAME-heldout.txt"
