# moverd: every target sets itself up (virtualenv + installs) on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYPROJECTS := pyproject.toml plugins/storage_s3/pyproject.toml plugins/catalog_scicat/pyproject.toml
NATIVE     := moverd/_md5mb.c setup.py

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install run demo test bench lint clean

$(STAMP): $(PYPROJECTS) $(NATIVE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]' -e plugins/storage_s3 -e plugins/catalog_scicat
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/moverd serve

demo: $(STAMP)
	$(BIN)/python -m moverd.demo

# Three test processes on two cores: most of the slow tests wait on subprocesses, leases and
# real timeouts, not on the CPU (the serial suite took ~16 min, three processes ~8).
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check moverd moverd_cli moverd_daemon plugins flows tests bench
	$(BIN)/mypy moverd moverd_cli moverd_daemon flows/moverd_flows plugins/storage_s3/moverd_storage_s3 plugins/storage_lts/moverd_storage_lts plugins/catalog_scicat/moverd_catalog_scicat
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV)
