# vdev — the commands a newcomer needs: `make demo` and `make test`.
# Everything external is provisioned by `make deps` into .deps/ (git-ignored);
# the Python environment lives in .venv/.  Both steps are idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all deps venv test demo bench soak test-debug lint clean-deps guest experiment finding-idio16 finding-qemu finding-libvfio-user finding-munmap-race kselftest kselftest-guest

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

test: deps guest kselftest-guest
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite once more against libvfio-user's debug build (-DDEBUG, AddressSanitizer):
# memory errors in the C layer abort the test that caused them.
# libstdc++ is preloaded with it so the sanitizer finds C++'s exception machinery
# (matplotlib's extensions throw) at start-up.
ASAN_RUNTIME := $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so.6)
test-debug: deps guest kselftest-guest
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

# The kernel's vfio selftests need a 7.x guest: its kernel set, and the selftests built from its source.
KSELFTEST_KERNEL ?= trixie-backports
kselftest-guest: deps
	@tools/guest.sh $(KSELFTEST_KERNEL)

# The kernel's vfio selftests in a 7.x guest against membar and ioat: results/kselftest.json,
# each program's TAP output and the console log under results/kselftest/.
kselftest: kselftest-guest
	$(PY) -m vdev_experiments.kselftest --out results $(KSELFTEST_ARGS)

# Style and types: ruff (lint and format) over everything Python, mypy over the package,
# devices and experiments, and the test that proves device parameters are typed.
LINTED := vdev devices experiments tests bench examples tools
lint: venv
	@$(PY) -m pip install --quiet --disable-pip-version-check ruff mypy
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy vdev devices experiments tests/model/test_params.py

clean-deps:
	rm -rf .deps

bench: deps
	$(PY) -m bench.run $(BENCH_ARGS)

# The concurrent-fault experiment on vfio-pci's memory enable, one guest per kernel
# (KERNELS="bookworm trixie" unless given; KERNEL=NAME|PATH for one, a path being a kernel
# of your own), REPEAT=N boots per kernel and mode, PATCH=FILE.diff to rebuild the vfio
# modules it touches (Debian sets): results/experiment.json, .md (verdict pass counts over
# the repeats), .png and console logs, then a fault matrix per kernel (faults per enable by BAR0
# size, alignment and 6.1's prefault variant; EXPERIMENT_ARGS=--no-fault-matrix skips it).
# PROGRAM=FILE runs that static mse-fault build instead of the initramfs's.  Only set names go
# to tools/guest.sh, which also provides the busybox and guest programs a kernel of your own
# boots with.
EXPERIMENT_KERNELS = $(or $(KERNELS),$(KERNEL),bookworm trixie)
experiment: deps
	@tools/guest.sh $(foreach k,$(EXPERIMENT_KERNELS),$(if $(findstring /,$(k)),,$(k)))
	$(PY) -m vdev_experiments.mse --kernels "$(EXPERIMENT_KERNELS)" --repeat $(or $(REPEAT),1) \
		$(if $(PATCH),--patch "$(PATCH)") $(if $(PROGRAM),--program "$(PROGRAM)") $(EXPERIMENT_ARGS)

# Finding 1 of docs/findings.md (gpio-pci-idio-16's regmap-irq NULL call) with its control, REPEAT=N boots
# per kernel and variant: results/findings/idio16-regmap-irq/ (outcome counts, runs, console excerpts).
finding-idio16: deps
	@tools/guest.sh $(or $(KERNELS),bookworm trixie)
	$(PY) -m tools.findings.idio16 --kernels "$(or $(KERNELS),bookworm trixie)" --repeat $(or $(REPEAT),3) $(FINDING_ARGS)

# Findings 2 and 3 of docs/findings.md (QEMU with a reply cut short), REPEAT=N sessions per variant, and the
# crash located in the QEMU binary with gdb: results/findings/qemu-partial-reply/.
finding-qemu: deps
	$(PY) -m tools.findings.qemu_partial_reply --repeat $(or $(REPEAT),20) --gdb $(FINDING_ARGS)

# Finding 4 of docs/findings.md: the provisioned libvfio-user's bugs, each shown through vdev's client.
finding-libvfio-user: deps
	$(PY) -m tools.findings.libvfio_user $(FINDING_ARGS)

# Finding 6 of docs/findings.md (vfio-pci 6.1's MEM-off zap racing munmap), REPEAT=N boots per kernel set. A race:
# nothing is asserted; each boot's outcome and a tally are printed and kept in results/findings/munmap-race/.
finding-munmap-race: deps
	@tools/guest.sh $(or $(KERNELS),bookworm)
	$(PY) -m tools.findings.munmap_race --kernels "$(or $(KERNELS),bookworm)" --repeat $(or $(REPEAT),30) $(FINDING_ARGS)
