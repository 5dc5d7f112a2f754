# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install benchmarks clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	$(BIN)/python -m ipykernel install --user --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m problems.demo --out results/demo

test: $(STAMP)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/hypergradient.py
	$(BIN)/python benchmarks/projection.py
	$(BIN)/python benchmarks/long_runs.py
	$(BIN)/python -m paper_repro.scalebio.run --settings memory,overhead --out results/benchmarks_scalebio
	$(BIN)/python -m paper_repro.stn.run --settings overhead --out results/benchmarks_stn

clean:
	rm -rf $(VENV) results .pytest_cache
