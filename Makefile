# mongo-broker developer commands. `make run` and `make test` work on a fresh
# machine: they create the virtualenv and build the test database server.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.tools/bin
export PATH := $(TOOLS):$(PATH)
# Go-built helper binaries go into .tools/bin, never into the user's GOPATH bin.
export GOBIN := $(TOOLS)

.PHONY: run test check proto venv tools clients clean soak bench

## run: the demo: hundreds of short-lived workers through one broker
run: venv tools
	$(PY) -m bench.demo

## test: the whole test suite against a real MongoDB-compatible server
test: venv tools clients
	$(PY) -m pytest $(PYTEST_ARGS)

## bench: every mode side by side; writes bench/results/REPORT.md and plots (about 25 min)
bench: venv tools
	$(PY) -m bench.bench $(BENCH_ARGS)

## soak: 30 minutes of mixed load with a fault every two minutes (not part of CI)
soak: venv tools
	$(PY) -m bench.soak --minutes $(or $(SOAK_MINUTES),30)

## check: lint, format check and type check
check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy broker clients/python/broker_client harness bench tests
	$(VENV)/bin/hadolint Dockerfile
	cd clients/go && test -z "$$(gofmt -l .)" && go vet ./...

## proto: regenerate the gRPC code from protos/ (Python, Go, and the Node copy)
proto: venv
	$(PY) protos/generate.py
	$(PY) protos/generate_go.py
	node clients/node/scripts/copy-proto.js

## clients: install what the Go and Node clients' tests need
clients: clients/node/node_modules/.package-lock.json
	cd clients/go && go mod download && go build ./...
	cd clients/go/internal/tools && go mod download

clients/node/node_modules/.package-lock.json: clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --ignore-scripts --no-audit --no-fund

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	touch $@

# Pinned Go tools the tests drive: a network-fault proxy between the broker
# and the database, and real third-party gRPC clients.
# grpcurl and grpc-health-probe are pinned, with every dependency, by
# bench/gotools/go.mod and go.sum.
TOXIPROXY_VERSION := v2.12.0

tools: $(TOOLS)/ferretdb $(TOOLS)/toxiproxy-server $(TOOLS)/grpcurl $(TOOLS)/ghz

# ghz, the gRPC load generator the benchmark drives, pinned by bench/ghz/go.mod.
$(TOOLS)/ghz: bench/ghz/go.mod bench/ghz/go.sum
	mkdir -p $(TOOLS)
	cd bench/ghz && go build -o $@ github.com/bojand/ghz/cmd/ghz

$(TOOLS)/grpcurl: bench/gotools/go.mod bench/gotools/go.sum
	mkdir -p $(TOOLS)
	cd bench/gotools && go build -o $(TOOLS)/ github.com/fullstorydev/grpcurl/cmd/grpcurl github.com/grpc-ecosystem/grpc-health-probe

# FerretDB v1.24 (SQLite backend), the test server when no mongod is at hand.
$(TOOLS)/ferretdb: bench/ferretdb/go.mod bench/ferretdb/go.sum bench/ferretdb/main.go
	mkdir -p $(TOOLS)
	cd bench/ferretdb && go build -o $@ .

$(TOOLS)/toxiproxy-server:
	mkdir -p $(TOOLS)
	go install github.com/Shopify/toxiproxy/v2/cmd/server@$(TOXIPROXY_VERSION)
	mv $(TOOLS)/server $@

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache clients/node/node_modules
