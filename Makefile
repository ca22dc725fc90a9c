# The README's commands. `make demo` and `make test` work on a fresh Debian machine: they install
# the system packages (apt) and the Python package with its extras first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
BUILD_DIR ?= build/cpp
ASAN_BUILD_DIR ?= build/asan
APT_PACKAGES := g++ make libeigen3-dev libgtest-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: demo test deps install test-cpp test-asan test-python fuzz bench lint format clean

demo: install
	$(PYTHON) -m moelb demo

test: install test-cpp test-asan test-isa test-python

# System packages, installed only when missing.
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	$(PIP) install -q "cmake>=3.20" ninja

install: deps
	$(PIP) install -q ".[test,torch,notebooks]"

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
test-python:
	MOELB_REQUIRE_OPTIONAL=1 $(PYTHON) -m pytest tests/python -q

# Random inputs instead of CI's fixed ones: every property test and fuzz target with a fresh seed
# (printed; `make fuzz SEED=N` replays it) and a larger budget (FUZZ_EXAMPLES per property, ten
# times the fixed budgets of test_fuzz.py). Run before an issue is called done; keep every failure
# it finds as a regression test.
SEED ?= $(shell $(PYTHON) -c "import random; print(random.randrange(2**32))")
FUZZ_EXAMPLES ?= 500
fuzz:
	@echo "make fuzz: seed $(SEED) (replay: make fuzz SEED=$(SEED))"
	MOELB_FUZZ_SEED=$(SEED) MOELB_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTHON) -m pytest tests/python \
	  -q -p no:cacheprovider --hypothesis-profile=fuzz --hypothesis-seed=$(SEED) \
	  --ignore=tests/python/test_notebooks.py --ignore=tests/python/test_benchmarks.py

bench: install
	$(PYTHON) benchmarks/run_all.py

lint:
	$(PYTHON) -m ruff check python tests benchmarks
	$(PYTHON) -m ruff format --check python tests benchmarks
	clang-format --dry-run -Werror cpp/include/moelb/*.hpp cpp/src/*.cpp cpp/src/*.hpp \
	  cpp/bindings/*.cpp cpp/bindings/*.hpp tests/cpp/*.cpp tests/cpp/*.hpp

format:
	$(PYTHON) -m ruff format python tests benchmarks
	clang-format -i cpp/include/moelb/*.hpp cpp/src/*.cpp cpp/src/*.hpp cpp/bindings/*.cpp \
	  cpp/bindings/*.hpp tests/cpp/*.cpp tests/cpp/*.hpp

clean:
	rm -rf build _skbuild dist *.egg-info

# The portable build's kernels on CPUs without AVX-512 (and without AVX): the C++ tests of routing,
# EPLB and Waterfill and the ISA-path tests, run from the test-cpp build under QEMU's user-mode
# emulation of older CPUs. Nehalem (SSE4.2, no AVX) must get the baseline path, Haswell (AVX2, FMA)
# the avx2 path; an instruction the emulated CPU lacks stops the run with SIGILL. (QEMU's emulator
# has no AVX-512, so that path runs only on real hardware: benchmarks/README.md.) About a minute of
# CPU time (QEMU translates every instruction).
QEMU_X86 ?= qemu-x86_64
ISA_TEST_CPUS ?= Nehalem:baseline Haswell:avx2
ISA_TEST_FILTER ?= CpuIsa.*:*Routing*:ScoreLanes.*:*HashRouter*:*Eplb*:DeepSeekGolden.*:DeepSeekGlobal.*:$\
  Moelb*:*Rebalance*:Waterfill.*
.PHONY: test-isa
test-isa: test-cpp
	@if [ "$$(uname -m)" != x86_64 ]; then echo "test-isa: not an x86-64 host, skipped"; exit 0; fi; \
	if ! command -v $(QEMU_X86) >/dev/null; then \
	  echo "apt-get install: qemu-user"; $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq qemu-user; fi; \
	for spec in $(ISA_TEST_CPUS); do cpu=$${spec%%:*}; isa=$${spec##*:}; \
	  echo "test-isa: emulated $$cpu CPU, expecting the $$isa path"; \
	  env -u MOELB_ISA MOELB_EXPECT_ISA=$$isa $(QEMU_X86) -cpu $$cpu $(BUILD_DIR)/moelb_tests \
	    --gtest_filter='$(ISA_TEST_FILTER)' --gtest_brief=1 || exit 1; done
