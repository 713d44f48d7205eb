# lupool — see README.md. Every target works on a fresh machine after
# ./scripts/install-test-deps.sh (which `make test` runs for you).

GO      ?= go
BIN     ?= bin/lupool
FUZZTIME ?= 30s

.PHONY: all build run test test-short lint vet fmt-check bench bench-go fuzz deps clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/lupool

# A working single-node pool with defaults: data in ./lupool-data,
# NBD on 127.0.0.1:10809, API on 127.0.0.1:10810, peers on 127.0.0.1:10811.
run: build
	./$(BIN) serve

deps:
	./scripts/install-test-deps.sh

# The one test command (README, .ci/run): dependencies, lint, race tests.
# One package at a time (-p 1): the fault and timing tests of one package
# (raft under faults, leases, RSS) must not share the 2 cores with another
# package's three-node end-to-end runs.
test: deps lint
	$(GO) test -race -p 1 -count=1 -timeout 15m ./...
	# Memory figures of the real daemon mean nothing under -race.
	$(GO) test -count=1 -timeout 5m -run '^TestFrontDoorStalledReaders$$' ./cmd/lupool/

test-short: lint
	$(GO) test -short -count=1 ./...

lint: vet fmt-check

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

# End-to-end fio comparison against nbdkit and qemu-nbd (bench/README.md).
bench: build
	./bench/run.sh --quick

# Go micro-benchmarks beside the code.
bench-go:
	$(GO) test -run '^$$' -bench . -benchmem ./...

# Runs every fuzz target for FUZZTIME each; corpora live in testdata/fuzz.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

clean:
	rm -rf bin
