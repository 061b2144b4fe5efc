# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both create the virtual environment on first use. torch is pinned to the CPU wheel first: a bare `torch`
# requirement would pull a multi-GB CUDA build. Never install torchvision (it breaks the PIL image processors).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@if $(PY) -c "import torchvision" 2>/dev/null; then echo "torchvision is installed: remove it (pip uninstall torchvision)"; exit 1; fi
	touch $@

demo: install
	$(VENV)/bin/causalmm demo

lint: install
	$(PY) -m ruff check src tests

test: install lint
	$(PY) -m pytest -q
