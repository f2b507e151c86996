# Every target creates .venv and installs what it needs, idempotently.
# `torch` is pinned through constraints.txt so that this machine resolves it to the local CPU build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= optimlab-out

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optimlab bench --quick --db $(OUT)/optimlab.db
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
