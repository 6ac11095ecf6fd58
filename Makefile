# The only commands a newcomer needs. `make test` and `make demo` install first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-gpu demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Two workers (pytest-xdist): most tests start `advtrain` processes, whose start-up runs on one core.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-slow: install
	$(PY) -m pytest -q -m slow

test-gpu: install
	$(PY) -m pytest -q -m gpu

demo: install
	$(PY) -m advtrain.demo

# Every bench writes bench/results/<name>.json; readme_table.py then rewrites bench/README.md's figures from them.
# bench/evaluation_cost.py needs a second checkout (--baseline), so it is run by hand; its file stays in the table.
bench: install
	$(PY) bench/step_cost.py
	$(PY) bench/tensorized_cost.py
	$(PY) bench/deepfool_cost.py
	$(PY) bench/adr_cost.py
	$(PY) bench/sgr_cost.py
	$(PY) bench/covariance_cost.py
	$(PY) bench/sweep_cost.py
	$(PY) bench/readme_table.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
