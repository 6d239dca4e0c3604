# The two commands of the README: `make demo` (main job on the embedded defaults) and `make test`.
# Both create .venv when missing and install everything once; the stamp makes a second run a no-op.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed
DEMO   ?= demo
DRY_RUN ?= 0
OUT    ?= gpu-check-out
# the exact tested set (constraints.txt): every install below takes its versions from it
PINS   := constraints.txt

.PHONY: venv sysdeps demo test lint clean-demo gpu-check

venv: $(STAMP)

# torch first; sam2 and deepspeed then build against it as pure-Python packages (no CUDA ops);
# the project last, editable, with all its extras. The stamp is newer than every file read here.
$(STAMP): setup.cfg pyproject.toml $(PINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(PINS) torch torchvision
	$(PIP) install -q "setuptools>=64" wheel ninja
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation -c $(PINS) sam2
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -c $(PINS) deepspeed
	$(PIP) install -q --no-build-isolation -c $(PINS) -e ".[deepspeed,server,dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/autosam2 demo --output-dir $(DEMO) --overwrite

# system packages the tests start for real: a single-node SLURM (slurm-wlm, munge, slurmdbd, MariaDB),
# and Debian's Chromium for the MLflow UI test (Playwright drives it; no browser download)
sysdeps:
	@command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null && command -v ip >/dev/null \
		|| bash launch/slurm_test_cluster.sh install
	@command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# two pytest-xdist workers: the SLURM tests on one, the rest beside them (tests/README.md); -n0: serially
PYTEST_ARGS ?= -n 2
test: $(STAMP) sysdeps
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The device check (launch/gpu_check.sh): here it builds the wheelhouse the GPU machine needs; there it
# installs it and measures the GPU path into $(OUT)/gpu_check.json. DRY_RUN=1: the same on the CPU, tiny.
gpu-check:
	@if [ "$(DRY_RUN)" = 1 ]; then $(MAKE) --no-print-directory $(STAMP); fi
	DRY_RUN=$(DRY_RUN) OUT=$(OUT) bash launch/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check autosam2 launch shards tests
	$(VENV)/bin/ruff format --check autosam2 launch shards tests

clean-demo:
	rm -rf $(DEMO)
