# The two set-up commands (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
export HF_HUB_OFFLINE = 1
export RAY_USAGE_STATS_ENABLED = 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0

.PHONY: install demo test lint toy-benchmark

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

# data/sample: 48 synthetic scenes (python -m gem.toy.scenes data/sample --count 48
# --per-shard 24), labeled by the bundled toy model gemlabel-toy; gallery in
# out/demo/_gemlabel/gallery.
demo: install
	$(VENV)/bin/gemlabel run 'data/sample/shard-{000000..000001}.tar' \
		--vocab data/sample/vocab.txt --out out/demo --overwrite --model gemlabel-toy \
		--image-size 64 --top-k 4 --score-threshold 0.1 --mask-mode background
	$(VENV)/bin/gemlabel view out/demo

toy-benchmark: install
	$(VENV)/bin/python -m benchmarks.toy_benchmark --work out/toy-benchmark --count 100

test: install
	$(VENV)/bin/ruff check gem pipeline jobs tests benchmarks
	$(VENV)/bin/pytest -q tests

lint: install
	$(VENV)/bin/ruff check gem pipeline jobs tests benchmarks
	$(VENV)/bin/ruff format --check gem pipeline jobs tests benchmarks
