# distill-pipeline: the two commands a new user needs.
#   make demo   set up .venv and run jobs/demo.yaml end to end
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned so pip takes the CPU wheel on disk, not a multi-GB CUDA build.
PINS   := torch==2.13.0 "ray[default,train,data,tune]==2.60.0" deepspeed==0.19.8 pyarrow==26.0.1 \
          s3fs==2026.9.0 pyyaml==6.0.4 pydantic==2.14.4 numpy==2.4.6 scikit-learn==1.9.1 matplotlib==3.11.2 croniter==7.0.0 \
          datasketches==5.2.0 onnx==1.23.2 onnxruntime==1.31.1 onnxscript==0.7.2 markdown==3.11.3 \
          mlflow-skinny==3.18.0 sqlalchemy==2.1.9 alembic==1.20.1
TEST_PINS := pytest==9.2.0 hypothesis==6.170.17 "moto[server]==5.2.5" boto3==1.43.117 playwright==1.65.2

.PHONY: demo test soak setup browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q $(PINS) $(TEST_PINS)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# The page tests drive Debian's chromium (Playwright's own browsers cannot be downloaded here). Installed
# when missing and we are root; elsewhere the page tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed (not root, or no apt-get): the browser tests will skip"; }

demo: setup
	$(BIN)/distill run jobs/demo.yaml

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The long fault tests `make test` leaves out: 30 nightly cycles killed at random points (tests/test_soak.py;
# SOAK_NIGHTS=N for a bounded run), nodes lost on a multi-node cluster (tests/test_node_loss.py) and a teacher
# search on one (tests/test_cluster_search.py).
SOAK_NIGHTS ?= 30
soak: setup
	DISTILL_SOAK_NIGHTS=$(SOAK_NIGHTS) $(BIN)/python -m pytest -m soak -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs data .pytest_cache
