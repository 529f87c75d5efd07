# Fresh machine: `make demo` (set up + pre-train on the sample data) or `make test` (set up + tests;
# `make test-fast` leaves out the tests marked slow).
# Everything Python goes into .venv in this checkout; system packages come from apt when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the set-up needs: FFCV builds from source against OpenCV and libjpeg-turbo.
SYS_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config

.PHONY: setup sysdeps demo test test-fast test-slow avgdist clean

setup: $(VENV)/.installed

sysdeps:
	@missing="$$(for p in $(SYS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: setup.py | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,ffcv,dali,stream]'
	touch $@

data/sample/.complete: | setup
	$(VENV)/bin/simmim sample-data --out data/sample

demo: setup data/sample/.complete
	$(VENV)/bin/simmim pretrain --config demo
	@echo "reconstruction: runs/demo/reconstruction.png   metrics: runs/demo/metrics.jsonl"

# every test, the `slow` ones included (CI runs this); `make test-fast` leaves out the slow tier
test: setup
	$(PY) -m pytest -q tests

test-fast: setup  # without the slow tier, for developers
	$(PY) -m pytest -q -m "not slow" tests

test-slow: setup  # the slow tier alone (multi-process FSDP2 / DCP over gloo, dry runs), minutes on 2 cores
	$(PY) -m pytest -q -m slow tests

avgdist: setup
	$(VENV)/bin/simmim bench avgdist --out results/avgdist

clean:
	rm -rf runs results data/sample
