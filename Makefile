# vdev — the commands a newcomer needs: `make demo` and `make test`.
# Everything external is provisioned by `make deps` into .deps/ (git-ignored);
# the Python environment lives in .venv/.  Both steps are idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all deps venv test demo bench soak test-debug lint clean-deps guest experiment

all: test

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing vdev and its test dependencies into $(VENV)"
	@( $(PY) -m pip install --disable-pip-version-check --upgrade pip && \
	   $(PY) -m pip install --disable-pip-version-check -e '.[test,examples]' ) >$(VENV)/pip.log 2>&1 || \
	   { cat $(VENV)/pip.log; echo "pip install failed (log above)"; exit 1; }
	@touch $@

venv: $(VENV)/.installed

deps: venv
	@tools/provision.sh

test: deps guest
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite once more against libvfio-user's debug build (-DDEBUG, AddressSanitizer):
# memory errors in the C layer abort the test that caused them.
# libstdc++ is preloaded with it so the sanitizer finds C++'s exception machinery
# (matplotlib's extensions throw) at start-up.
ASAN_RUNTIME := $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so.6)
test-debug: deps guest
	VDEV_LIBVFIO_USER=$(CURDIR)/.deps/libvfio-user-debug/lib/libvfio-user.so.0 \
	VDEV_LIBVFIO_USER_REVISION=$$(cat .deps/libvfio-user-debug/REVISION) \
	LD_PRELOAD="$(ASAN_RUNTIME)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:handle_sigbus=0 \
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# The leak soak at full length (the suite runs it with 200 cycles).
soak: deps
	VDEV_SOAK_CYCLES=1000 $(PY) -m pytest tests/robustness/test_soak.py $(PYTEST_ARGS)

demo: deps
	$(PY) examples/demo.py

# Guest kernels + initramfs for tests/guest (KERNELS="bookworm trixie sid"; default bookworm and
# bookworm-security; versions pinned in tools/guest/kernels.pin).
guest: deps
	@tools/guest.sh $(KERNELS)

# Style and types: ruff (lint and format) over everything Python, mypy over the package,
# devices and experiments.
LINTED := vdev devices experiments tests bench examples tools
lint: venv
	@$(PY) -m pip install --quiet --disable-pip-version-check ruff mypy
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy vdev devices experiments

clean-deps:
	rm -rf .deps

bench: deps
	$(PY) -m bench.run $(BENCH_ARGS)

# The concurrent-fault experiment on vfio-pci's memory enable, one guest per kernel
# (KERNELS="bookworm trixie" unless given), REPEAT=N boots per kernel and mode:
# results/experiment.json, .md (verdict pass counts over the repeats), .png and console logs.
experiment: deps
	@tools/guest.sh $(or $(KERNELS),bookworm trixie)
	$(PY) -m vdev_experiments.mse --kernels "$(or $(KERNELS),bookworm trixie)" --repeat $(or $(REPEAT),1) $(EXPERIMENT_ARGS)
