# Two commands are the contract with a new user:
#   make demo   set up .venv, generate the demo data, train, evaluate, print where results are
#   make test   set up .venv with the test needs and run every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Idle OpenMP threads sleep: every script sets it itself (chexnet/idle_threads.py).
DEMO_DATA ?= data/demo
DEMO_OUT ?= results
# The demo recipe: DenseNet-121 from scratch (no download) on 64x64 phantoms, sized to finish
# in a few minutes on 2 CPU cores. See the README for what each flag means.
DEMO_FLAGS ?= --image-size 64 --batch-size 32 --lr 0.05 --epochs 5 --weights none

.PHONY: demo test test-fast test-portable lint clean-demo help notebooks reference
help:
	@echo "make demo   - train and evaluate on the built-in demo data (CPU is fine)"
	@echo "make test   - lint (ruff) and run the whole test suite"
	@echo "make test-fast - the tests not marked slow (a developer's loop)"
	@echo "make test-portable - the training and bitwise tests under AVX-512, AVX2 and SSE4.1 kernels"
	@echo "make notebooks - install JupyterLab into .venv and open notebooks/"
	@echo "make reference - download reproduce-chexnet's published results into pretrained/ (4 MB)"

$(VENV)/.python-ok:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed; run make PYTHON=python3.x")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@touch $@

# The scripts are installed as modules (pip install -e ., see pyproject.toml) so that tests,
# benchmarks and notebooks import them without touching sys.path.
$(VENV)/.deps: requirements.txt pyproject.toml $(VENV)/.python-ok
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.test-deps: requirements-test.txt requirements-notebooks.txt $(VENV)/.deps
	$(PY) -m pip install --quiet -r requirements-test.txt
	@touch $@

# The demo runs the real pipeline: generate data in the NIH format, prepare the uint8 cache
# once, train (reading the cache), then score the test fold with bootstrap CIs.
demo: $(VENV)/.deps
	@test -f $(DEMO_DATA)/nih/Data_Entry_2017.csv || $(PY) demo_data.py --out $(DEMO_DATA) --kind nih
	$(PY) prepare_data.py nih --data $(DEMO_DATA)/nih --labels $(DEMO_DATA)/nih/Data_Entry_2017.csv --image-size 64 --split random
	@# A previous demo run is never deleted: this one goes to the first free name (demo, demo-2, ...).
	@name=demo; n=1; while [ -e $(DEMO_OUT)/$$name ]; do n=$$((n + 1)); name=demo-$$n; done; \
	if [ $$name != demo ]; then echo "$(DEMO_OUT)/demo holds an earlier demo run (kept): this one is $(DEMO_OUT)/$$name (to replace it instead: rm -rf $(DEMO_OUT)/demo, then make demo)"; fi; \
	set -ex; \
	$(PY) retrain.py --dataset demo --data $(DEMO_DATA)/nih --name $$name --out $(DEMO_OUT) $(DEMO_FLAGS); \
	$(PY) eval_model.py --preds $(DEMO_OUT)/$$name/preds.csv --ci --roc $(DEMO_OUT)/$$name/roc.png --thresholds --no-published; \
	set +x; \
	echo "Demo finished: results in $(DEMO_OUT)/$$name/ (aucs.csv, aucs_ci.csv, roc.png, preds.csv, log_train.csv, checkpoint.pt)"; \
	$(PY) -c "import pandas as pd, torch; t = pd.read_csv('$(DEMO_OUT)/$$name/aucs.csv').set_index('label'); print(f'demo test fold mean AUC: {t.loc[\"mean\", \"auc\"]:.4f} (on {torch.cuda.get_device_name() if torch.cuda.is_available() else torch.backends.cpu.get_cpu_capability() + \" CPU kernels\"}: the same on every run on this machine, not across machine kinds; see README)')"

# TEST_JOBS workers (pytest-xdist), each running whole test files, so a file's shared runs
# (module fixtures) are built once and its fixed torchrun ports never meet another file's.
# make test TEST_JOBS=8 on a bigger machine; TEST_JOBS=0 runs in this one process.
TEST_JOBS ?= 2
test: $(VENV)/.test-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile

# The fast part of the suite (no training runs, no subprocesses): for a developer's loop.
test-fast: $(VENV)/.test-deps
	$(PY) -m pytest -m "not slow"

# The tests that train networks, and the bitwise ones, once per CPU kernel setting this machine
# can run (native, AVX2, SSE4.1): a test must not depend on one kernel's rounding.
test-portable: $(VENV)/.test-deps
	$(PY) tests/portable.py -- -n $(TEST_JOBS) --dist loadfile

# JupyterLab on the notebooks (each notebook's first cell finds the repository itself).
$(VENV)/.notebook-deps: requirements-notebooks.txt $(VENV)/.deps
	$(PY) -m pip install --quiet -r requirements-notebooks.txt
	@touch $@

notebooks: $(VENV)/.notebook-deps
	$(VENV)/bin/jupyter lab notebooks/

# reproduce-chexnet's published preds.csv, aucs.csv and log_train, checked by sha256.
reference: $(VENV)/.deps
	$(PY) fetch_reference.py

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_OUT)/demo

.PHONY: bench-data bench-bootstrap bench-train bench-localization bench-subgroups
bench-data: $(VENV)/.deps
	$(PY) benchmarks/data_pipeline.py
bench-bootstrap: $(VENV)/.deps
	$(PY) benchmarks/bootstrap.py
bench-train: $(VENV)/.deps
	$(PY) benchmarks/train_throughput.py --check-amp --json benchmarks_train.json
bench-localization: $(VENV)/.deps
	$(PY) benchmarks/localization_demo.py
bench-subgroups: $(VENV)/.deps
	$(PY) benchmarks/subgroups_reference.py
