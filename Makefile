# The two commands of the README: `make sample` (main job on the embedded model) and `make test`.
VENV := .venv
PROMPT ?= I bought this
POTENTIAL ?= sentiment:1
PARTICLES ?= 32
TOKENS ?= 24

.PHONY: setup sample test bench

setup:
	@bash scripts/setup.sh

sample: setup
	$(VENV)/bin/twistlm sample --prompt "$(PROMPT)" --potential "$(POTENTIAL)" --particles $(PARTICLES) --max-new-tokens $(TOKENS) --seed 0

test: setup
	$(VENV)/bin/python -m pytest -q

# llamppl's own requirements pull ~30 unused packages; the benchmark needs only these three (benchmarks/README.md).
bench: setup
	$(VENV)/bin/python -m pip install -q --no-deps "llamppl>=0.2,<0.3" "genlm-backend>=0.3,<0.4"
	$(VENV)/bin/python -m pip install -q numba
	$(VENV)/bin/python benchmarks/bench_speed.py --memory --scaling
