# The README's commands. `make demo` and `make test` work on a fresh Debian/Ubuntu machine: they
# install the system packages (apt), make a virtual environment ($(VENV)) and install the Python
# package with the extras the target needs into it. Every Python command below (pip, pytest, ruff,
# moelb) runs in that environment, so the system's Python, externally managed on Debian 12 and
# Ubuntu 23.04+ (PEP 668: it refuses `pip install`), is never written to.

# The interpreter that makes the virtual environment (any Python 3.10-3.13), e.g.
# `make test PYTHON3=python3.12`. VENV may name an existing environment with pip, used as it is.
PYTHON3 ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# cmake, ninja and ctest are pip-installed into the environment: recipes find them there first.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The PyTorch that `make test` and `make bench` install before moelb's extras (pip arguments;
# skipped when the environment already has torch). The `torch` extra asks only for torch>=2.13.0,
# the oldest release tested: given a range and no torch, pip takes the newest release, on Linux
# x86-64 a CUDA build of several GB. This pins the tested release; point it elsewhere with e.g.
# `make test TORCH_SPEC="torch==2.13.0 --index-url URL"` (URL: PyTorch's CPU-only wheel index),
# or leave the choice to pip with `TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0

BUILD_DIR ?= build/cpp
ASAN_BUILD_DIR ?= build/asan
APT_PACKAGES := g++ make libeigen3-dev libgtest-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CLANG_FORMAT ?= $(firstword $(foreach c,clang-format clang-format-14,\
  $(shell command -v $(c) 2>/dev/null)) clang-format)

.PHONY: demo test venv deps torch install install-demo installed ruff test-cpp test-asan \
  test-python fuzz bench lint format clean distclean

demo: install-demo
	$(PYTHON) -m moelb demo

test: install test-cpp test-asan test-isa test-python

# The virtual environment, made once. A Debian/Ubuntu Python without ensurepip cannot make one
# ("ensurepip is not available"): then apt's python3-venv, and python3.X-venv for the base
# interpreter's version X where apt has it, are installed and the environment made again.
venv:
	@if ! $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	  echo "$(PYTHON3) -m venv $(VENV)"; \
	  if ! $(PYTHON3) -m venv $(VENV); then \
	    command -v apt-get >/dev/null || { echo "make: $(PYTHON3) -m venv failed and there is" \
	      "no apt-get: install your system's venv package or pass PYTHON3=another python"; \
	      exit 1; }; \
	    version=$$($(PYTHON3) -c 'import sys; print("%d.%d" % sys.version_info[:2])') || exit 1; \
	    $(APT_GET) update -qq || exit 1; \
	    packages=python3-venv; \
	    if apt-cache show python$$version-venv >/dev/null 2>&1; then \
	      packages="$$packages python$$version-venv"; fi; \
	    echo "apt-get install: $$packages"; \
	    $(APT_GET) install -y -qq $$packages && $(PYTHON3) -m venv $(VENV) || exit 1; \
	  fi; \
	fi

# System packages, installed only when missing, and the build tools in the environment.
deps: venv
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  $(APT_GET) update -qq && $(APT_GET) install -y -qq $$missing; \
	fi
	$(PIP) install -q "cmake>=3.20" ninja

torch: venv
ifneq ($(strip $(TORCH_SPEC)),)
	@if ! $(PYTHON) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; \
	then echo "pip install $(TORCH_SPEC)"; $(PIP) install -q $(TORCH_SPEC); fi
endif

# What `make demo` needs: moelb and matplotlib for its plots (no PyTorch).
install-demo: deps
	$(PIP) install -q ".[plots]"

# What the tests need: every optional dependency (PyTorch first, see TORCH_SPEC). The extension is
# built in $(BUILD_DIR) with the C++ tests, so that test-cpp, which configures the same directory
# with the same flags (Release, portable), finds the library compiled and only checks it: one
# Release build of the kernels instead of two.
install: deps torch
	$(PIP) install -q -Cbuild-dir=$(BUILD_DIR) -Ccmake.define.MOELB_BUILD_TESTS=ON \
	  ".[test,torch,notebooks]"

# For the targets that run what is installed: `make install` only when moelb or pytest is missing.
installed: venv
	@$(PYTHON) -c "import moelb, pytest, hypothesis, xdist" 2>/dev/null || $(MAKE) --no-print-directory install

test-cpp: deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DMOELB_BUILD_TESTS=ON -DMOELB_BUILD_PYTHON=OFF
	cmake --build $(BUILD_DIR) -j $(JOBS)
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)

# The C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer (and LeakSanitizer): -O1 with
# Eigen's bounds asserts on, and portable code (MOELB_NATIVE=OFF, SSE2 only) so that the
# generic vector paths are tested too. The first report fails the run (-fno-sanitize-recover=all,
# halt_on_error). One process, so the sanitizer runtime starts once (about 10 s; the build a few
# minutes).
ASAN_OPTIONS ?= halt_on_error=1:abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:$\
  strict_string_checks=1:check_initialization_order=1:strict_init_order=1
UBSAN_OPTIONS ?= halt_on_error=1:abort_on_error=1:print_stacktrace=1
test-asan: deps
	cmake -S . -B $(ASAN_BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g" \
	  -DMOELB_SANITIZE="address;undefined" -DMOELB_NATIVE=OFF \
	  -DMOELB_BUILD_TESTS=ON -DMOELB_BUILD_PYTHON=OFF
	cmake --build $(ASAN_BUILD_DIR) -j $(JOBS) --target moelb_tests
	ASAN_OPTIONS="$(ASAN_OPTIONS)" UBSAN_OPTIONS="$(UBSAN_OPTIONS)" \
	  $(ASAN_BUILD_DIR)/moelb_tests --gtest_brief=1

# MOELB_REQUIRE_OPTIONAL=1: the install step brought every optional dependency, so a test that
# skips for a missing import (notebooks, plots, torch) fails instead (tests/python/conftest.py).
# PYTEST_JOBS: pytest-xdist workers (`auto`: one per core; 0: one process, the order of the files).
PYTEST_JOBS ?= auto
test-python: installed
	MOELB_REQUIRE_OPTIONAL=1 $(PYTHON) -m pytest tests/python -q -n $(PYTEST_JOBS) --dist worksteal

# Random inputs instead of CI's fixed ones: every property test and fuzz target with a fresh seed
# (printed; `make fuzz SEED=N` replays it) and a larger budget (FUZZ_EXAMPLES per property, ten
# times the fixed budgets of test_fuzz.py). Run before an issue is called done; keep every failure
# it finds as a regression test. The seed is drawn once, in the recipe's shell, so the one printed
# is the one used.
SEED ?=
FUZZ_EXAMPLES ?= 500
fuzz: installed
	@seed="$(SEED)"; \
	[ -n "$$seed" ] || seed=$$($(PYTHON) -c "import random; print(random.randrange(2**32))"); \
	echo "make fuzz: seed $$seed (replay: make fuzz SEED=$$seed)"; \
	set -x; MOELB_FUZZ_SEED=$$seed MOELB_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTHON) -m pytest \
	  tests/python -q -p no:cacheprovider --hypothesis-profile=fuzz --hypothesis-seed=$$seed \
	  --ignore=tests/python/test_notebooks.py --ignore=tests/python/test_benchmarks.py

# The benchmarks need moelb and PyTorch (the `bench` extra; PyTorch first, see TORCH_SPEC).
bench: deps torch
	$(PIP) install -q ".[bench]"
	$(PYTHON) benchmarks/run_all.py

ruff: venv
	@$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PIP) install -q "ruff>=0.4"

lint: ruff
	$(PYTHON) -m ruff check python tests benchmarks
	$(PYTHON) -m ruff format --check python tests benchmarks
	$(CLANG_FORMAT) --dry-run -Werror cpp/include/moelb/*.hpp cpp/src/*.cpp cpp/src/*.hpp \
	  cpp/bindings/*.cpp cpp/bindings/*.hpp tests/cpp/*.cpp tests/cpp/*.hpp

format: ruff
	$(PYTHON) -m ruff format python tests benchmarks
	$(CLANG_FORMAT) -i cpp/include/moelb/*.hpp cpp/src/*.cpp cpp/src/*.hpp cpp/bindings/*.cpp \
	  cpp/bindings/*.hpp tests/cpp/*.cpp tests/cpp/*.hpp

# Build outputs; distclean also removes the virtual environment.
clean:
	rm -rf build _skbuild dist *.egg-info

distclean: clean
	rm -rf $(VENV)

# The portable build's kernels on CPUs without AVX-512 (and without AVX): the C++ tests of routing,
# EPLB, Waterfill, the quantised-weight GEMM and the layer in each weight format, and the ISA-path
# tests, run from the test-cpp build under QEMU's user-mode emulation of older CPUs. Nehalem
# (SSE4.2, no AVX) must get the baseline path, Haswell (AVX2, FMA) the avx2 path; an instruction
# the emulated CPU lacks stops the run with SIGILL. (QEMU's emulator has no AVX-512, so that path
# runs only on real hardware: benchmarks/README.md.) About a minute of CPU time per CPU (QEMU
# translates every instruction).
QEMU_X86 ?= qemu-x86_64
ISA_TEST_CPUS ?= Nehalem:baseline Haswell:avx2
ISA_TEST_FILTER ?= CpuIsa.*:*Routing*:ScoreLanes.*:*HashRouter*:*Eplb*:DeepSeekGolden.*:DeepSeekGlobal.*:$\
  Moelb*:*Rebalance*:Waterfill.*:QuantGemm.*:WeightFormat.*:*MoELayerFormats.MatchesReference*
.PHONY: test-isa
test-isa: test-cpp
	@if [ "$$(uname -m)" != x86_64 ]; then echo "test-isa: not an x86-64 host, skipped"; exit 0; fi; \
	if ! command -v $(QEMU_X86) >/dev/null; then \
	  echo "apt-get install: qemu-user"; $(APT_GET) update -qq && \
	  $(APT_GET) install -y -qq qemu-user; fi; \
	for spec in $(ISA_TEST_CPUS); do cpu=$${spec%%:*}; isa=$${spec##*:}; \
	  echo "test-isa: emulated $$cpu CPU, expecting the $$isa path"; \
	  env -u MOELB_ISA MOELB_EXPECT_ISA=$$isa $(QEMU_X86) -cpu $$cpu $(BUILD_DIR)/moelb_tests \
	    --gtest_filter='$(ISA_TEST_FILTER)' --gtest_brief=1 || exit 1; done
