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

# Rebuild the shipped default model folder (a random placeholder until trained weights land).
assets: $(STAMP)
	$(BIN)/python -m engine.init_model --preset shapes --out assets/shapes --seed 0

clean:
	rm -rf $(VENV) outputs .pytest_cache
