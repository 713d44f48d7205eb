# lupool — see README.md. Every target works on a fresh machine after
# ./scripts/install-test-deps.sh (which `make test` runs for you).

GO      ?= go
BIN     ?= bin/lupool
FUZZTIME ?= 30s

# make install: DESTDIR stages into a tree (packaging), PREFIX is where the
# binary goes; the unit's ExecStart follows PREFIX. The config, env file
# and data directory are fixed: /etc/lupool and /var/lib/lupool.
DESTDIR ?=
PREFIX  ?= /usr/local
SYSTEMDUNITDIR ?= /lib/systemd/system

.PHONY: all build run test test-short lint vet fmt-check bench bench-go fuzz deps clean install uninstall

all: build

# -buildvcs=auto: the binary names its commit (lupool version) when built
# from a git checkout, whatever GOFLAGS says.
build:
	$(GO) build -buildvcs=auto -o $(BIN) ./cmd/lupool

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
	$(GO) test -race -p 1 -count=1 -timeout 30m ./...
	# Memory figures of the real daemon mean nothing under -race, a race
	# build cannot lock its memory, and the VM that swaps through the pool
	# needs the CPU the race detector would take from QEMU.
	$(GO) test -count=1 -timeout 10m -run '^(TestFrontDoorStalledReaders|TestSwapSafeProcesses|TestPagingVMSwaps)$$' ./cmd/lupool/
	# Allocation counts: sync.Pool drops items on purpose under -race, so
	# these skip there and run here.
	$(GO) test -count=1 -timeout 5m -run '^(TestMirrorWrite4KAllocations|TestHotPathAllocations|TestNoAllocations)$$' ./replication/ ./server/endpoint/ ./internal/bufpool/

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

# Installs the binary, the systemd unit, the example config (only when
# /etc/lupool/lupool.json does not exist: an operator's config is never
# overwritten) and the data directory (0700; an existing one keeps its
# mode). README.md, "Running as a service".
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/lupool
	install -D -m 0644 scripts/lupool.service $(DESTDIR)$(SYSTEMDUNITDIR)/lupool.service
	sed -i 's|^ExecStart=/usr/local/bin/lupool |ExecStart=$(PREFIX)/bin/lupool |' $(DESTDIR)$(SYSTEMDUNITDIR)/lupool.service
	[ -d $(DESTDIR)/etc/lupool ] || install -d -m 0755 $(DESTDIR)/etc/lupool
	@if [ -e $(DESTDIR)/etc/lupool/lupool.json ]; then \
	  echo "keeping $(DESTDIR)/etc/lupool/lupool.json (the example is scripts/lupool.example.json)"; \
	else \
	  echo "install -m 0640 scripts/lupool.example.json $(DESTDIR)/etc/lupool/lupool.json"; \
	  install -m 0640 scripts/lupool.example.json $(DESTDIR)/etc/lupool/lupool.json; \
	fi
	[ -d $(DESTDIR)/var/lib/lupool ] || install -d -m 0700 $(DESTDIR)/var/lib/lupool
	@if [ -z "$(DESTDIR)" ]; then echo "next: systemctl daemon-reload && systemctl enable --now lupool"; fi

# Removes what install put in place except the config and the data: those
# are the operator's (and the data are the LUs).
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/lupool $(DESTDIR)$(SYSTEMDUNITDIR)/lupool.service
	@echo "kept $(DESTDIR)/etc/lupool and $(DESTDIR)/var/lib/lupool; remove them by hand to drop the config and every LU on this node"
