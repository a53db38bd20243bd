# Two commands: `make run` (the main job) and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test assets lint clean-flwr experiments report check-default-run

# torch first, pinned: anything that pulls an unpinned torch first gets GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The embedded default federation (RCSR, 10 clients) as a Flower simulation;
# exits non-zero when the run failed. Extra overrides: make run ARGS='-c "num-server-rounds=2"'
run: $(STAMP)
	$(PY) -m rcsr_flower.runtime.launch --app-dir . --flwr-home .flwr --num-supernodes 10 $(ARGS)

# An experiment suite (experiments/$(SUITE).toml), then its report in docs/results/$(SUITE)/.
# Completed cells are skipped; the report is written even when some cells failed.
SUITE ?= smoke
# The README's overview of a suite is rewritten when it has the suite's markers.
README_OVERVIEW = $(if $(shell grep -l "results:$(SUITE):start" README.md),--readme README.md)
experiments: $(STAMP)
	$(PY) -m rcsr_flower.experiments run --suite $(SUITE) $(ARGS); status=$$?; \
	$(PY) -m rcsr_flower.experiments report --suite $(SUITE) $(README_OVERVIEW) && exit $$status

report: $(STAMP)
	$(PY) -m rcsr_flower.experiments report --suite $(SUITE) $(README_OVERVIEW)

# Two workers (pytest-xdist), a file at a time: a third of the serial suite's core-time
# is idle (heartbeat windows, round timeouts, start-ups), which the other worker fills;
# tests/conftest.py hands out the slow files first. ARGS='-n 0' runs it in one process.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

# A fresh default run must reproduce the committed one (docs/results/default-run): every
# metrics.jsonl field but seconds, within 0.2 rsum a round.
check-default-run: $(STAMP)
	rm -rf outputs/check-default-run
	$(PY) -m rcsr_flower.runtime.launch --app-dir . --flwr-home .flwr --num-supernodes 10 \
		-c 'run-name="check-default-run"' $(ARGS)
	$(PY) -m rcsr_flower.experiments compare outputs/check-default-run docs/results/default-run

assets: $(STAMP)
	$(PY) -m rcsr_flower.embedded.assets build

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
