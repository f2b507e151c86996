# Every target creates .venv and installs what it needs, idempotently.
# `torch` is pinned through constraints.txt so that this machine resolves it to the local CPU build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= optimlab-out

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	@echo "== installing optimlab into $(VENV) with its dependencies (torch CPU, numpy, scipy, scikit-learn, matplotlib,"
	@echo "   optuna, SQLAlchemy, tensorboard, typer/rich) and the test and benchmark extras (pytest, lion-pytorch,"
	@echo "   schedulefree, pytorch-optimizer, psycopg): about 3 minutes the first time on 2 cores, quiet while pip works"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench,postgres]'
	touch $(STAMP)
	@echo "== installed ($(VENV)); later make targets skip this step until pyproject.toml or constraints.txt change"

demo: $(STAMP)
	@echo "== optimlab bench --quick: 4 optimizers tuned on the test functions and digits (about 1-2 minutes on 2 cores)"
	$(VENV)/bin/optimlab bench --quick --db $(OUT)/optimlab.db
	@echo "== the HTML report of that run"
	$(VENV)/bin/optimlab report latest --db $(OUT)/optimlab.db -o $(OUT)/report

# One intra-op thread: the tests are dominated by small tensors, where OpenMP's threads cost more than they
# give (the suite ran 19 min with the default threads beside other work, 2.5 min with one).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --out docs

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
