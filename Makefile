# The two set-up commands (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
export HF_HUB_OFFLINE = 1
export RAY_USAGE_STATS_ENABLED = 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER = 0

.PHONY: install demo test lint toy-benchmark

# editable_mode=compat: a path entry to the checkout, so modules added after the install
# import in every process (Ray's workers included) without reinstalling; setuptools warns
# that the mode is transitional, a dozen times, hence no warnings during the install.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "installing into $(VENV) (pip, a few minutes the first time)"
	@$(PYTHON) -m venv $(VENV)
	@PYTHONWARNINGS=ignore $(PIP) install -q --upgrade pip
	@PYTHONWARNINGS=ignore $(PIP) install -q -c constraints.txt -e '.[test]' \
		--config-settings editable_mode=compat
	@touch $@

install: $(VENV)/.installed

# data/sample: 48 synthetic scenes (python -m gem.toy.scenes data/sample --count 48
# --per-shard 24), labeled by the bundled toy model gemlabel-toy; gallery in
# out/demo/_gemlabel/gallery.
demo: install
	@echo "gemlabel run: data/sample (48 scenes) labeled by the toy model -> out/demo"
	@$(VENV)/bin/gemlabel run 'data/sample/shard-{000000..000001}.tar' \
		--vocab data/sample/vocab.txt --out out/demo --overwrite --model gemlabel-toy \
		--image-size 64 --top-k 4 --score-threshold 0.1 --mask-mode background
	@$(VENV)/bin/gemlabel view out/demo
	@echo "next: open the gallery above; source .venv/bin/activate, then gemlabel status out/demo, gemlabel report out/demo (README: Read the result)"

toy-benchmark: install
	$(VENV)/bin/python -m benchmarks.toy_benchmark --work out/toy-benchmark --count 100

test: install
	$(VENV)/bin/ruff check gem pipeline jobs tests benchmarks
	$(VENV)/bin/pytest -q --durations=30 tests

lint: install
	$(VENV)/bin/ruff check gem pipeline jobs tests benchmarks
	$(VENV)/bin/ruff format --check gem pipeline jobs tests benchmarks
