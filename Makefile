# The two commands of the README: `make demo` and `make test`. Both set up .venv when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PyTorch is installed first and pinned: on the reference machines these wheels lie on local disk.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.segcalib-installed

.PHONY: demo test setup benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segcalib demo

test: $(STAMP)
	$(PY) -m pytest -q

benchmark: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs .pytest_cache
