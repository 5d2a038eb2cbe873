# Two commands on a fresh clone: `make demo` and `make test`.
#
# torch is pinned to a CPU build for the project's own dev and CI install path only (the package itself keeps
# an open range). On a machine where pip would otherwise pick a multi-gigabyte CUDA build, point it at a CPU
# index, e.g. `make TORCH_INDEX=https://download.pytorch.org/whl/cpu test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/train_tiny_gpt.py

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) lightning_logs build *.egg-info
