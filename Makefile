# Two set-up commands for a new user: `make demo` and `make test`. Both create
# .venv and build the C extension themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
NATIVE_SOURCES := csrc/alpc_native.c csrc/alpc_native.h csrc/qlpc.c csrc/qlpc.h csrc/build_ffi.py
PYTEST_ARGS ?=

.PHONY: all venv build demo test test-native test-pure lint soak bench bench-quick bench-readme fuzz asan clean

all: build

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# Rebuild the extension in place whenever its sources change.
alpc/.native-built: $(STAMP) $(NATIVE_SOURCES)
	$(PY) -W ignore setup.py --quiet build_ext --inplace
	touch $@

build: alpc/.native-built

demo: build
	$(PY) examples/demo.py

# The two suites run side by side (each mostly waits on its peers' handshakes): about 5 min
# on 2 CPUs instead of 9. Each one's output is printed when it ends.
test: build lint
	@echo "running the native and the pure-Python suites side by side; each prints its report when it ends"
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-native test-pure

test-native: build
	ALPC_REQUIRE_NATIVE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-pure: build
	ALPC_PUREPYTHON=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(wildcard alpc tests benchmarks examples csrc)
	$(VENV)/bin/mypy

# Minutes, not hours: clients, servers and a chaos thread killing all of them (and the broker).
SOAK_ARGS ?= --duration 180
soak: build
	$(PY) tests/soak.py $(SOAK_ARGS)

# Coverage-guided fuzzing (atheris) of the wire decoder, the channel, the broker's
# request parser and the handshake, with the C extension and its Python twin.
# `make test` runs each briefly (tests/test_fuzz.py); this runs them at length.
FUZZ_SECONDS ?= 120
fuzz: build
	$(PY) tests/fuzz/campaign.py --seconds $(FUZZ_SECONDS) --artifacts build/fuzz-artifacts

# The C bounds checks under AddressSanitizer and UBSan: a driver feeding the C
# parsers edge cases and random inputs, every buffer at its exact length.
CC ?= cc
ASAN_ITERATIONS ?= 2000000
ASAN_CFLAGS := -std=c11 -g -O1 -Wall -Wextra -Werror -fsanitize=address,undefined -fno-sanitize-recover=all \
	-fno-omit-frame-pointer
build/asan/native_driver: csrc/alpc_native.c csrc/alpc_native.h tests/asan/native_driver.c
	mkdir -p build/asan
	$(CC) $(ASAN_CFLAGS) -Icsrc -DALPC_SOURCE_HASH='"asan"' csrc/alpc_native.c tests/asan/native_driver.c -o $@

build/asan/qlpc_driver: csrc/qlpc.c csrc/qlpc.h tests/asan/qlpc_driver.c
	mkdir -p build/asan
	$(CC) $(ASAN_CFLAGS) -Icsrc csrc/qlpc.c tests/asan/qlpc_driver.c -o $@ -lpthread

asan: build/asan/native_driver build/asan/qlpc_driver
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		build/asan/native_driver $(ASAN_ITERATIONS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		build/asan/qlpc_driver $(ASAN_ITERATIONS)

# The bench extra (plot, progress bar, pyzmq and grpcio peers) only for the
# benchmarks, so `make test` never waits for it.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

# Full run (< 10 min on 2 cores): table on stdout, benchmarks/results/latest.{json,md,png}.
bench: build $(BENCH_STAMP)
	$(PY) -m benchmarks

# Smoke run (< 1 min): the same, written to benchmarks/results/quick/.
bench-quick: build $(BENCH_STAMP)
	$(PY) -m benchmarks --quick

# Copy the summary of benchmarks/results/latest.json into README.md.
bench-readme: $(STAMP)
	$(PY) -m benchmarks.report --update-readme

clean:
	rm -rf $(VENV) build alpc/_alpc_native* alpc/.native-built *.egg-info .pytest_cache .mypy_cache .ruff_cache \
		benchmarks/results/quick benchmarks/results/partial
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
