# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both create the virtual environment on first use, lmms-eval included (its plugin's tests run in CI). torch is
# pinned to the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build. Never install
# torchvision (it breaks the PIL image processors).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The oldest transformers pyproject.toml allows, read from it so the bound and its test cannot drift apart.
OLDEST_VENV ?= build/venv-oldest
OLDEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
# What depends most on transformers: every family's model and processor, loading, the KV cache.
OLDEST_TESTS := tests/test_families.py tests/test_generic_families.py tests/test_loading.py tests/test_cache.py

.PHONY: install demo test lint test-oldest browser
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,lmms,app]"
	@# lmms-eval without its declared requirements (they pull torchvision and a CUDA torch); the lmms extra above
	@# holds what it imports at run time (docs/integrations.md)
	$(PY) -m pip install -q --no-deps "lmms-eval>=0.7.3,<0.8"
	@if $(PY) -c "import torchvision" 2>/dev/null; then echo "torchvision is installed: remove it (pip uninstall torchvision)"; exit 1; fi
	touch $@

# The two worlds side by side, one torch thread each: on 2 cores about 5 minutes against 8 one after the other (the
# 0.8M-parameter model is bound by Python, not arithmetic). The vision-prior run writes to its log, shown at the end.
demo: install
	@mkdir -p runs
	@OMP_NUM_THREADS=1 $(VENV)/bin/causalmm demo --world vision-prior --out runs/demo-vision-prior \
	  > runs/demo-vision-prior.log 2>&1 & vision=$$!; \
	OMP_NUM_THREADS=1 $(VENV)/bin/causalmm demo; default=$$?; \
	wait $$vision; status=$$?; echo; echo "causalmm demo --world vision-prior (runs/demo-vision-prior.log):"; \
	cat runs/demo-vision-prior.log; [ $$default = 0 ] && [ $$status = 0 ]

lint: install
	$(PY) -m ruff check src tests

# Debian's Chromium and ChromeDriver for the browser tests; where they cannot be installed those tests skip, saying so
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "Chromium could not be installed (apt-get failed): the browser tests will skip"; fi

test: install lint browser
	$(PY) -m pytest -q --durations=25

# The same tests on the oldest transformers pyproject.toml allows, in a venv of its own (about 2 minutes to build).
$(OLDEST_VENV)/.installed: pyproject.toml
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[test]" "transformers==$(OLDEST_TRANSFORMERS)"
	@if $(OLDEST_VENV)/bin/python -c "import torchvision" 2>/dev/null; then echo "torchvision is installed in $(OLDEST_VENV): remove it"; exit 1; fi
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	@echo "transformers $$($(OLDEST_VENV)/bin/python -c 'import transformers; print(transformers.__version__)')"
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)
