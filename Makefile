# Two entry points for a fresh machine (see README):
#   make demo   install, then extract attention from the bundled samples (offline, random weights) and
#               score every map against the sample annotations
#   make test   install, then lint and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WAREHOUSE ?= data/warehouse

.PHONY: install demo test lint ui dashboard bench shell

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	DAGSTER_HOME=$(CURDIR)/dagster_home $(BIN)/ssl-attention run --images data/samples --models all \
		--weights random --warehouse $(WAREHOUSE) --annotations data/samples/annotations.json
	@echo
	@echo "Dagster UI:  DAGSTER_HOME=$(CURDIR)/dagster_home $(BIN)/dg dev   (http://127.0.0.1:3000; make ui)"
	@echo "Dashboard:   $(BIN)/ssl-attention serve --warehouse $(WAREHOUSE)                       (http://127.0.0.1:5006/app)"
	@echo "SQL:         $(BIN)/ssl-attention sql --warehouse $(WAREHOUSE) \"SELECT * FROM models\""
	@echo "Head ranking: $(BIN)/ssl-attention sql --warehouse $(WAREHOUSE) \"SELECT model, method, layer, entry, mean, rank FROM head_ranking WHERE metric = 'iou_50' AND feature = 'all' ORDER BY model, method, layer, rank\""
	@echo "SQL prompt:  duckdb -readonly -cmd \"SET file_search_path = '$(WAREHOUSE)'\" $(WAREHOUSE)/attention.duckdb   (DuckDB's client: make shell installs it)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/dg check defs
	$(BIN)/dagster definitions validate -w workspace.yaml
	$(BIN)/pytest

# `dg dev` loads the dg project of pyproject.toml ([tool.dg]); `dagster dev -w workspace.yaml` still works too
ui: install
	DAGSTER_HOME=$(CURDIR)/dagster_home $(BIN)/dg dev

dashboard: install
	$(BIN)/ssl-attention serve --warehouse $(WAREHOUSE)

shell: install
	$(BIN)/python -m pip install --quiet -e '.[shell]'
	@echo "then: $(BIN)/duckdb -readonly -cmd \"SET file_search_path = '$(WAREHOUSE)'\" $(WAREHOUSE)/attention.duckdb"
