# Two commands do everything on a fresh Linux machine with Python 3.10+:
#   make train   create .venv, install minillm, train the default GPT (configs/pydocs_char.toml)
#   make test    create .venv, install minillm with test tools and MPI, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: train test install install-dev clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[mpi]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[mpi,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

train: install
	$(BIN)/minillm train configs/pydocs_char.toml $(ARGS)

# What the whole suite takes on an idle 2-core machine (measured; README "Two commands").
TEST_MINUTES := 7

test: install-dev
	@echo "make test: the whole suite takes about $(TEST_MINUTES) minutes on an idle 2-core machine;" \
	  "this one has $$(nproc) cores and a load average of $$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo '?')" \
	  "(a busy machine takes longer)"
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs
