# The two set-up commands (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
export HF_HUB_OFFLINE = 1
export RAY_USAGE_STATS_ENABLED = 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gemlabel run 'data/sample/shard-{000000..000001}.tar' \
		--vocab data/sample/vocab.txt --out out/demo --image-size 224

test: install
	$(VENV)/bin/ruff check gem pipeline jobs tests benchmarks
	$(VENV)/bin/pytest -q tests

lint: install
	$(VENV)/bin/ruff check gem pipeline jobs tests benchmarks
	$(VENV)/bin/ruff format --check gem pipeline jobs tests benchmarks
