# ultron_kernels: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
# nvcc's toolkit root, as nvcc itself reports it (nvcc may be a wrapper script; torch's own
# guess then points at the wrong folder and the link fails to find -lcudart).
CUDA_HOME ?= $(shell command -v nvcc >/dev/null && nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p' | head -n1 | xargs -r readlink -f)
export CUDA_HOME
# TORCH_CUDA_ARCH_LIST: unset, setup.py builds for the local GPU, or without one for
# 8.0;8.6;8.9;9.0+PTX (README, Supported GPUs). Set it to build for others.
export MAX_JOBS ?= 2
OUT ?= $(CURDIR)/runs/latest

.PHONY: help venv build cmake-build test demo bench gpu-lease gpu-versions clean

help:
	@echo "make test       build everything (venv, CUDA extension) and run the CPU test suite"
	@echo "make demo       the main job: ULTRON model, reference vs kernel backends, report"
	@echo "make bench      benchmark quick preset (needs a GPU for timings)"
	@echo "make gpu-lease  on a GPU machine, one call of at most ~8 min: build, self-check, headline"
	@echo "                benchmark rows, GPU tests, compute-sanitizer; four files in \$$OUT (README)"
	@echo "make gpu-lease REHEARSE=1   the same script on this machine's CPU (tiny shapes)"
	@echo "make gpu-versions   import, build and rehearse with the GPU machine's torch/triton"

# The venv: torch (CUDA 13.0 build, from the local wheel cache on the project's machines),
# triton comes with it; test and model extras. Never installs over an existing user torch:
# the venv is the project's own.
$(VENV)/.ready: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	$(PIP) install -q numpy pytest pytest-xdist hypothesis pytest-benchmark ninja matplotlib tqdm scikit-image timm faiss-cpu
	touch $@

venv: $(VENV)/.ready

# pip-installed CUDA headers (cusparse.h etc.) that the toolkit on these machines lacks.
NV_INCLUDE = $(shell $(PY) -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'))" 2>/dev/null)

# Editable install (ultron_kernels and python/ultron) plus the extension; redone only when
# the C++/CUDA sources or the build files change.
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h')
$(VENV)/.built: $(VENV)/.ready $(BUILD_INPUTS)
	CPLUS_INCLUDE_PATH="$(NV_INCLUDE):$$CPLUS_INCLUDE_PATH" $(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import ultron_kernels._cuda as c; print('ultron_kernels._C built:', c.HAS_CUDA_EXTENSION, c.CUDA_EXTENSION_ERROR)"
	touch $@

build: $(VENV)/.built

# With nvcc present the extension must build and register (a broken csrc fails the tests).
# The CMake build of csrc for C++ users (see CMakeLists.txt), checked for one architecture
# (9.0 unless TORCH_CUDA_ARCH_LIST says otherwise; the pip build covers the others). Torch's
# CMake config wants the NVRTC library, which pip's CUDA runtime ships but the toolkit here lacks.
NV_LIB = $(patsubst %/include,%/lib,$(NV_INCLUDE))
cmake-build: venv
	$(PIP) install -q cmake
	TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} CPLUS_INCLUDE_PATH="$(NV_INCLUDE):$$CPLUS_INCLUDE_PATH" \
	  $(VENV)/bin/cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DCUDA_TOOLKIT_ROOT_DIR="$(CUDA_HOME)" -DCMAKE_CUDA_COMPILER="$(CUDA_HOME)/bin/nvcc" \
	  -DPython3_EXECUTABLE="$(CURDIR)/$(PY)" \
	  $$(f=$$(ls $(NV_LIB)/libnvrtc.so* 2>/dev/null | head -n1); [ -n "$$f" ] && echo -DCUDA_nvrtc_LIBRARY=$$f)
	CPLUS_INCLUDE_PATH="$(NV_INCLUDE):$$CPLUS_INCLUDE_PATH" $(VENV)/bin/cmake --build build/cmake -j $(MAX_JOBS)

test: build cmake-build
	ULTRON_KERNELS_REQUIRE_EXTENSION=$$(command -v nvcc >/dev/null && echo 1 || echo 0) \
	  $(PY) -m pytest -q -n 2 --durations=25 tests

demo: build
	$(PY) -m ultron demo

bench: build
	$(PY) -m bench --preset quick --out "$(OUT)"

# On the GPU machine, with its own python3 (its torch and triton, not our pins): the whole
# lease in one call (tools/gpu_lease.py: steps in order of value, each in its own time box),
# four files in $(OUT). REHEARSE=1: the same script on this machine's CPU, tiny shapes,
# Triton's interpreter and the CUDA host simulation; it fails on any step that did not end well.
gpu-lease: $(if $(REHEARSE),build)
	$(if $(REHEARSE),$(PY),python3) tools/gpu_lease.py $(if $(REHEARSE),--rehearse) --out "$(OUT)"

# The GPU machine's torch and triton (device tool, KINDS.md), checked here before a window
# depends on them: a venv of those versions (kept across runs in GPU_VERSIONS_VENV: about a
# minute and 5 GB to make), then in a copy of the tree (its in-place build must not replace
# .venv's extension) every module imported, the extension built for sm_90, the lease
# rehearsed, and every Triton launch compiled for sm_90 by that Triton (tools/compile_triton.py).
GPU_TORCH ?= 2.11.0
GPU_TRITON ?= 3.6.0
GPU_TORCHVISION ?= 0.26.0
GPU_VERSIONS_VENV ?= $(HOME)/.cache/ultron_kernels/venv-torch$(GPU_TORCH)-triton$(GPU_TRITON)
GPU_VERSIONS_DIR = build/gpu-versions
gpu-versions:
	test -f $(GPU_VERSIONS_VENV)/.ready || { rm -rf $(GPU_VERSIONS_VENV) && python3 -m venv $(GPU_VERSIONS_VENV) && \
	  $(GPU_VERSIONS_VENV)/bin/pip install -q --upgrade pip setuptools wheel && \
	  $(GPU_VERSIONS_VENV)/bin/pip install -q "torch==$(GPU_TORCH)" "triton==$(GPU_TRITON)" \
	    "torchvision==$(GPU_TORCHVISION)" numpy pytest hypothesis ninja tqdm scikit-image timm && \
	  touch $(GPU_VERSIONS_VENV)/.ready; }
	rm -rf $(GPU_VERSIONS_DIR) && mkdir -p $(GPU_VERSIONS_DIR)/tree
	git ls-files -z | xargs -0 cp --parents -t $(GPU_VERSIONS_DIR)/tree
	cd $(GPU_VERSIONS_DIR)/tree && $(GPU_VERSIONS_VENV)/bin/python tools/gpu_lease.py --rehearse --build \
	  --out "$(CURDIR)/$(GPU_VERSIONS_DIR)/out"
	cd $(GPU_VERSIONS_DIR)/tree && env -u TRITON_INTERPRET PYTHONPATH=. $(GPU_VERSIONS_VENV)/bin/python tools/compile_triton.py \
	  --arch 90 --json "$(CURDIR)/$(GPU_VERSIONS_DIR)/out/triton_sm90.json"

clean:
	rm -rf build *.egg-info ultron_kernels/_C*.so runs
