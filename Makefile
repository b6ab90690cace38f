# Two commands are the contract with a new user:
#   make demo   set up .venv, generate the demo data, train, evaluate, print where results are
#   make test   set up .venv with the test needs and run every test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/demo
DEMO_OUT ?= results
# The demo recipe: DenseNet-121 from scratch (no download) on 64x64 phantoms, sized to finish
# in a few minutes on 2 CPU cores. See the README for what each flag means.
DEMO_FLAGS ?= --image-size 64 --batch-size 32 --lr 0.05 --epochs 5 --weights none

.PHONY: demo test clean-demo help
help:
	@echo "make demo   - train and evaluate on the built-in demo data (CPU is fine)"
	@echo "make test   - run the whole test suite"

$(VENV)/.python-ok:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed; run make PYTHON=python3.x")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@touch $@

$(VENV)/.deps: requirements.txt $(VENV)/.python-ok
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.test-deps: requirements-test.txt $(VENV)/.deps
	$(PY) -m pip install --quiet -r requirements-test.txt
	@touch $@

demo: $(VENV)/.deps
	@test -f $(DEMO_DATA)/nih/Data_Entry_2017.csv || $(PY) demo_data.py --out $(DEMO_DATA) --kind nih
	rm -rf $(DEMO_OUT)/demo
	$(PY) retrain.py --dataset demo --data $(DEMO_DATA)/nih --name demo --out $(DEMO_OUT) $(DEMO_FLAGS)
	@echo "Demo finished: see $(DEMO_OUT)/demo/ (aucs.csv, preds.csv, log_train.csv, checkpoint.pt)"

test: $(VENV)/.test-deps
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_OUT)/demo
