# Two entry points (see README): `make demo` and `make test`. Both create .venv when it is absent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean assets

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: otherwise a torch-dependent package pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m engine.generate --prompt "a red circle bouncing on a black background" --seconds 5 --out outputs/demo.mp4

test: $(STAMP)
	$(BIN)/python -m pytest

# Rebuild the shipped folders (README "The Shapes world, the oracle and training the built-in model"; each
# phase resumes its run folder under runs/ if interrupted). The shipped model is the `shapes-t2` preset (a latent
# frame stands for 2 video frames); its VAE and teacher start from the 4-frame (`shapes`) ones, so those come
# first:
# 1. assets/shapes: the architecture with random transformer and text-encoder weights (placeholders until the
#    last step).
# 2. The 4-frame VAE trained from scratch in the phases it went through (why: distill/train_vae.py), then its
#    decoder fine-tuned alone (runs/vae-t4); then the 2-frame VAE started from it (every tensor but the time
#    convs carries over) in two phases, the second with extra weight on the ring around objects, then its
#    decoder fine-tuned alone (so the teacher's latents stay valid), exported into assets/shapes/vae and evaluated
#    (held-out PSNR, oracle, a 2-minute streaming decode).
# 3. The 4-frame teacher and its learned text encoder on 3,000 encoded clips (runs/teacher), then the fixed word
#    code and clean-context training (runs/teacher-fx); then the 2-frame teacher on 3,000 clips encoded by the new
#    VAE, started from it (runs/teacher-t2), with a last cosine-annealed phase (runs/teacher-t2d), exported into
#    assets/shapes-teacher in fp16 and evaluated (oracle adherence on 50 prompts). Work in progress: see the
#    README's status table.
# 4. The causal student regressed on 1,000 teacher ODE trajectories (800 steps), exported into runs/ode-t2-model with
#    the teacher's text code and evaluated through the streaming engine (50 prompts and a 2-minute stream).
# 5. Self-forcing DMD from it against the teacher (400 steps, EMA sink, rollouts of 3 or 6 chunks), exported into
#    assets/shapes and evaluated (50 prompts and two 2-minute streams).
# 6. The preview decoder (engine/preview.py) on the VAE's latents in three phases (constant lr, then two cosine-annealed
#    ones, each started from the last one's export), exported into assets/shapes/preview and evaluated beside the VAE's own decoder
#    (held-out PSNR, oracle, a 2-minute streaming decode, ms a frame).
# 7. The VAE's decoder widened from base width 8 to 12 (the narrow one's weights carried over, the new channels
#    starting small) and fine-tuned alone in two cosine phases, so every latent stays as it was; exported into
#    assets/shapes/vae over the narrow one and evaluated.
SHAPES_DESCRIPTION := Shapes model under construction: random transformer and text encoder (seed 0) until the last steps below replace them
T2 := --preset shapes-t2
assets: $(STAMP)
	$(BIN)/python -m engine.init_model $(T2) --out assets/shapes --seed 0 --description "$(SHAPES_DESCRIPTION)"
	$(BIN)/python -m distill.train_vae --out runs/vae --steps 550 --lr 2e-4 --p-cut 0
	$(BIN)/python -m distill.train_vae --out runs/vae --steps 800 --lr 8e-4 --p-cut 0
	$(BIN)/python -m distill.train_vae --out runs/vae --steps 2700 --lr 5e-4 --p-cut 0.5
	$(BIN)/python -m distill.train_vae --out runs/vae --steps 3050 --lr 2e-4 --p-cut 0.5
	$(BIN)/python -m distill.train_vae --out runs/vae --export runs/vae-t4
	$(BIN)/python -m distill.train_vae --out runs/vae-dec --init runs/vae-t4 --freeze-encoder --motion-weight 1 --steps 600 --lr 2e-4
	$(BIN)/python -m distill.train_vae --out runs/vae-dec --export runs/vae-t4
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-t2 --init runs/vae-t4 --steps 600 --lr 5e-4 --motion-weight 1
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-t2 --steps 1100 --lr 3e-4 --motion-weight 1 --halo-weight 4
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-t2 --export runs/vae-t2-export
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-t2dec --init runs/vae-t2-export --freeze-encoder --motion-weight 1 --halo-weight 4 --lr 3e-4 --steps 878
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-t2dec --export assets/shapes/vae --eval 32
	$(BIN)/python -m distill.train_teacher --vae runs/vae-t4 --out runs/teacher --clips 3000 --steps 4500
	$(BIN)/python -m distill.train_teacher --out runs/teacher --steps 7400 --shift 5 --latent-lengths 5 5 9
	$(BIN)/python -m distill.train_teacher --out runs/teacher --export runs/teacher-t4
	$(BIN)/python -m distill.train_teacher --out runs/teacher-fx --init runs/teacher-t4 --text fixed --steps 4702 --shift 5 --latent-lengths 5 5 9 --p-context 0.5
	$(BIN)/python -m distill.train_teacher $(T2) --vae assets/shapes/vae --latents runs/latents-t2.safetensors --clips 3000 --out runs/teacher-t2 --init runs/teacher-fx --text fixed --steps 2885 --shift 5 --latent-lengths 5 9 17 --p-context 0.5 --ema 0.998
	$(BIN)/python -m distill.train_teacher $(T2) --latents runs/latents-t2.safetensors --out runs/teacher-t2d --init runs/teacher-t2 --text fixed --steps 700 --warmup 30 --lr-schedule cosine --shift 5 --latent-lengths 5 9 17 --p-context 0.5 --ema 0.995
	$(BIN)/python -m distill.train_teacher $(T2) --out runs/teacher-t2d --vae assets/shapes/vae --export assets/shapes-teacher --eval 50
	$(BIN)/python -m distill.ode_init $(T2) --teacher runs/teacher-t2d --vae assets/shapes/vae --pairs runs/ode-pairs-t2.safetensors --out runs/ode-t2 --steps 800
	$(BIN)/python -m distill.ode_init $(T2) --teacher runs/teacher-t2d --vae assets/shapes/vae --out runs/ode-t2 --export runs/ode-t2-model --eval 50
	$(BIN)/python -m distill.self_forcing --student runs/ode-t2-model --teacher assets/shapes-teacher --out runs/dmd --steps 400 --batch-size 8 --lr 5e-5 --rollout-chunks 3 6
	$(BIN)/python -m distill.self_forcing --out runs/dmd --export assets/shapes --eval 50
	$(BIN)/python -m distill.train_preview --vae assets/shapes/vae --out runs/preview-shapes --steps 800
	$(BIN)/python -m distill.train_preview --out runs/preview-shapes --export runs/preview-shapes-800 --eval 0
	$(BIN)/python -m distill.train_preview --vae assets/shapes/vae --init runs/preview-shapes-800 --out runs/preview-shapes-b --steps 400 --lr-schedule cosine --warmup 20 --ema 0.98 --seed 1
	$(BIN)/python -m distill.train_preview --out runs/preview-shapes-b --export runs/preview-shapes-b-model --eval 0
	$(BIN)/python -m distill.train_preview --vae assets/shapes/vae --init runs/preview-shapes-b-model --out runs/preview-c --steps 3000 --lr 1e-3 --lr-schedule cosine --warmup 20 --ema 0.99 --seed 2
	$(BIN)/python -m distill.train_preview --out runs/preview-c --export assets/shapes/preview
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-w12 --init assets/shapes/vae --decoder-base-dim 12 --freeze-encoder --motion-weight 1 --halo-weight 4 --steps 3000 --lr 2e-4 --lr-schedule cosine --warmup 50 --seed 4
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-w12 --export runs/vae-w12-export --eval 0
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-w12b --init runs/vae-w12-export --decoder-base-dim 12 --freeze-encoder --motion-weight 1 --halo-weight 4 --steps 2000 --lr 2e-4 --lr-schedule cosine --warmup 50 --seed 5
	$(BIN)/python -m distill.train_vae $(T2) --out runs/vae-w12b --export assets/shapes/vae --eval 32

clean:
	rm -rf $(VENV) outputs .pytest_cache
