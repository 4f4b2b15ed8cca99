# Everything bootstraps its own virtual environment: on a fresh machine `make test` and
# `make demo` need nothing but Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: venv test lint typecheck unit demo clean bench bench-peers bench-scale test-vllm test-trainers test-cluster

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not cluster"

# The scale-out tier: the endpoint limits, clean-up and connection errors on real Dask and Ray
# clusters (local ones, and ones started apart with `dask scheduler` / `ray start --head`).
test-cluster: $(STAMP)
	$(BIN)/pytest -m cluster

# The README's test command: lint, types, then every test. Fails loudly on the first problem.
test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/python -m vlpref.demo

# The vLLM tier: a real vLLM (CPU build) in its own environment, serving a tiny random model built
# locally (no download). .ci/vllm_venv.py says what the environment holds and why;
# docs/vllm.md says what the tier checks. The model is rebuilt only when missing.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml .ci/vllm_venv.py | cksum | cut -d' ' -f1)
TINY_VLM   := .cache/vlpref-tiny-vlm

$(VLLM_STAMP): pyproject.toml .ci/vllm_venv.py
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found" >&2; exit 1; }
	$(PYTHON) .ci/vllm_venv.py $(VLLM_VENV)
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python tests_vllm/build_tiny_model.py $(TINY_VLM)
	VLPREF_TINY_VLM=$(TINY_VLM) $(VLLM_VENV)/bin/python -m pytest -c tests_vllm/pytest.ini --rootdir . --durations=5 tests_vllm

# The trainers tier: TRL (CPU torch from the local wheel) in its own environment loads a TRL
# export of a freshly built version and runs its vision collator and two DPO steps on a tiny
# random model (.ci/trainers_venv.py says what it holds and why).
TRAINERS_VENV  := .venv-trainers
TRAINERS_STAMP := $(TRAINERS_VENV)/.installed-$(shell cat pyproject.toml .ci/trainers_venv.py | cksum | cut -d' ' -f1)

$(TRAINERS_STAMP): pyproject.toml .ci/trainers_venv.py
	@test -n "$(PYTHON)" || { echo "error: python3.11 not found" >&2; exit 1; }
	$(PYTHON) .ci/trainers_venv.py $(TRAINERS_VENV)
	rm -f $(TRAINERS_VENV)/.installed-*
	touch $@

test-trainers: $(TRAINERS_STAMP)
	$(TRAINERS_VENV)/bin/python -m pytest -c tests_trainers/pytest.ini --rootdir . tests_trainers

# Client throughput against the simulated server, written to bench/results/YYYY-MM-DD-client.md.
# Not part of `make test`. bench-peers adds curator and distilabel, each in a venv of its own
# under bench/.venvs/ (created on first use).
bench: $(STAMP)
	@$(BIN)/python -c "import pyinstrument" 2>/dev/null || $(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench

bench-peers: $(STAMP)
	@$(BIN)/python -c "import pyinstrument" 2>/dev/null || $(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench --peers

# The pipeline at scale (issue 6): 3,000 and 30,000 questions x 12 models at 0 and 50 ms, reruns
# timed on the 30,000 builds; bench/results/YYYY-MM-DD-scale.md. The 3,000-question builds run
# SCALE_REPEATS times (the report takes medians); a 30,000-question build takes 15-20 minutes
# and runs once. About an hour on 2 cores.
SCALE_RUNS := bench/results/$(shell date +%F)-scale.jsonl
SCALE_REPEATS ?= 3
bench-scale: $(STAMP)
	rm -f $(SCALE_RUNS)
	for i in $$(seq $(SCALE_REPEATS)); do \
		$(BIN)/python -m bench.scale_run --questions 3000 --json-out $(SCALE_RUNS) || exit 1; \
	done
	$(BIN)/python -m bench.scale_run --questions 30000 --rerun --json-out $(SCALE_RUNS)
	for i in $$(seq $(SCALE_REPEATS)); do \
		$(BIN)/python -m bench.scale_run --questions 3000 --latency-ms 50 \
			--json-out $(SCALE_RUNS) || exit 1; \
	done
	$(BIN)/python -m bench.scale_run --questions 30000 --latency-ms 50 --json-out $(SCALE_RUNS)
	$(BIN)/python -m bench.scale_report $(SCALE_RUNS) --out $(SCALE_RUNS:.jsonl=.md)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .mypy_cache .ruff_cache .pytest_cache
