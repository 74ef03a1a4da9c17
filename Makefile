# The two commands of the README: `make demo` and `make test`.
# Both create the environment in .venv if it is missing. On machines without an NVIDIA GPU the
# CPU build of torch is pinned (torch==2.13.0) and installed before anything else, so no later
# install can pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.studios-installed

.PHONY: demo test env bench bench-accuracy lint clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q torch; \
	else \
		$(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q -e ".[test,napari]"
	touch $(STAMP)

demo: $(STAMP)
	DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/studios run configs/demo.yaml --output demo-output

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

bench: $(STAMP)
	$(PY) bench/throughput.py

# about an hour on 2 cores: 2 seeds x (1, 3, 10 slices) x 6 methods, then the InSegt slices
bench-accuracy: $(STAMP)
	$(PIP) install -q -e ".[test,bench]"
	$(PY) bench/accuracy.py --json bench-output/accuracy.json

lint: $(STAMP)
	$(PY) -m ruff check pipeline flows tests bench
	$(PY) -m mypy pipeline

clean:
	rm -rf demo-output bench-output .pytest_cache
