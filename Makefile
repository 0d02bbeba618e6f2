# Two commands on a fresh machine: `make run` (the whole pipeline on NEU-DET) and `make test`.
# Both create .venv on first use (slimvit with its train and dev extras) and reinstall when
# pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PRESET ?= neu-det
OUT ?= runs/$(PRESET)
# --data: $SLIMVIT_DATA, else data/NEU-DET, else the shared copy beside the project.
DATA ?= $(firstword $(SLIMVIT_DATA) $(wildcard data/NEU-DET) $(wildcard ../shared/datasets/NEU-DET) data/NEU-DET)

.PHONY: run test lint install imbalanced

# The core install (`pip install slimvit`) is the torch-free edge path; `make run` and `make test` need
# the `train` extra too. The `openvino` extra is added where it installs (x86-64 and arm64 wheels);
# slimvit works without it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e ".[train,dev,openvino]" || \
		{ echo "note: the openvino extra did not install; continuing without it"; \
		  $(VENV)/bin/python -m pip install -q -e ".[train,dev]"; }
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/slimvit run --preset $(PRESET) --data $(DATA) --out $(OUT)

# The imbalanced-data benchmark (README, "Imbalanced data"): NEU-DET cut to 300/200/120/80/50/30 images
# per class, the default pipeline on it, and the same teacher + student without class balancing.
imbalanced: $(VENV)/.installed
	$(VENV)/bin/python scripts/imbalanced.py --data $(DATA) --balanced $(OUT) --twin

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
