# One place for installing, the demo and the tests. Every pip call goes through the constraints file
# (torch==2.13.0 CPU and exact pins for the rest): see ../shared/notes/toolchain.md.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip
# DeepSpeed is an sdist: build no ops at install time (they compile on first use); the constraint also reaches its
# isolated build environment so nothing pulls a CUDA torch.
PIPENV  = DS_BUILD_OPS=0 PIP_CONSTRAINT=$(CURDIR)/constraints.txt

.PHONY: install demo test test-all lint constraints clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIPENV) $(PIP) install -q --upgrade pip
	$(PIPENV) $(PIP) install -q -c constraints.txt -e '.[dev,embed,plot,deepspeed,gguf,tune]'
	touch $@

demo: install
	$(BIN)/rlrec pipeline --config recipes/quickstart.yaml

# The fast tier: every test not marked `slow` (each slow test says why in its marker).
test: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=12

# Everything, the slow tier included: what CI runs (.ci/run).
test-all: install
	$(BIN)/python -m pytest -q --durations=12

lint: install
	$(BIN)/ruff check rlrec tests bench
	$(BIN)/ruff format --check rlrec tests bench
	$(BIN)/lint-imports

# Re-freeze the exact pins from the current venv (after a deliberate upgrade).
constraints:
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) runs
