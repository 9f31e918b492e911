# cpews-sweep: `make test` and `make sweep` set up .venv on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pins that install from local wheels here and from PyPI elsewhere (see README).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Downloads cut off by the network are resumed (pip) and, failing that, the whole step is tried again (infra/bin/retry).
PIP_INSTALL := $(PY) -m pip install --quiet --resume-retries 10
RETRY := infra/bin/retry 3
PYTEST_ARGS ?=
SPACE ?= search_spaces/demo.yaml
SWEEP_ARGS ?=
RUN_DIR ?= runs
UI_PORT ?= 5000
SWEEP ?=
PROMOTE_ARGS ?=

.PHONY: install test test-all test-integration lint schema pretrain train sweep ui promote clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(RETRY) $(PY) -m pip install --quiet --upgrade pip
	$(RETRY) $(PIP_INSTALL) $(TORCH_SPEC) || $(RETRY) $(PIP_INSTALL) "torch>=2.3" "torchvision>=0.18"
	$(RETRY) $(PIP_INSTALL) -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

# Only the tests against real services (PostgreSQL, S3, mlflow server, multi-node Ray); `make test` runs them too.
test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cpews orchestration tests benchmarks

# The JSON Schema of sweep files that editors read (search_spaces/*.yaml name it on their first line); run it after
# changing the sweep-file models or the config tree (tests/orchestration/test_search_space.py checks it is current).
schema: $(STAMP)
	$(PY) -m orchestration.search_space --schema > search_spaces/schema.json.tmp \
		&& mv search_spaces/schema.json.tmp search_spaces/schema.json || { rm -f search_spaces/schema.json.tmp; exit 1; }

# The backbone pretrained on the synthetic world (model.weights=synthetic); `make train` and `make sweep` make it
# on first use, this target makes (or finds) it alone.
pretrain: $(STAMP)
	$(VENV)/bin/cpews pretrain

train: $(STAMP)
	$(VENV)/bin/cpews train --out runs/train

# RAY_ADDRESS=http://HEAD:8265 submits the sweep to that cluster as a Ray Job (RUN_DIR: an absolute shared folder).
sweep: $(STAMP)
	$(if $(RAY_ADDRESS),RAY_ADDRESS=$(RAY_ADDRESS)) $(VENV)/bin/cpews sweep run $(SPACE) --run-dir $(RUN_DIR) $(SWEEP_ARGS)

# Refit the best configuration of SWEEP (default: the latest sweep), score it, register it, gate @champion.
promote: $(STAMP)
	$(VENV)/bin/cpews promote $(SWEEP) --run-dir $(RUN_DIR) $(PROMOTE_ARGS)

# The MLflow UI over the local store that `make sweep` writes (MLFLOW_TRACKING_URI, when set, is a server already).
ui: $(STAMP)
	mkdir -p $(RUN_DIR)/mlflow
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(UI_PORT) \
		--backend-store-uri sqlite:///$(abspath $(RUN_DIR))/mlflow/mlflow.db \
		--default-artifact-root file://$(abspath $(RUN_DIR))/mlflow/artifacts

clean:
	rm -rf runs .pytest_cache
