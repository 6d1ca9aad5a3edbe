# Leasehold — run `make help` for the targets.
SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
BIN         := $(CURDIR)/bin
BUF         := tools/buf/node_modules/.bin/buf
PROTO_TOOLS := $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc $(BIN)/grpcurl
GO_TEST     ?= go test -race -count=1
export PATH := $(BIN):$(PATH)
# Build and test with the patched Go release: govulncheck (make lint) finds
# standard-library vulnerabilities (crypto/x509, crypto/tls, net/http) in
# earlier 1.26 releases. The go command fetches it once from the module
# proxy (~76 MB). Machines default to GOTOOLCHAIN=local, which would ignore
# a toolchain line in go.mod, hence the export.
export GOTOOLCHAIN := go1.26.10
# The vulnerability database govulncheck reads: a pinned snapshot of
# golang.org/x/vulndb from the module proxy, so results are reproducible and
# no other network is needed. Bump it to pick up new reports.
VULNDB_VERSION := v0.0.0-20261105234957-e22db6528018
LINT_TOOLS := $(BIN)/golangci-lint $(BIN)/govulncheck

.PHONY: help deps tools grpcurl build example-orchestrator example-cluster generate generate-check lint breaking test test-go bench bench-etcd bench-postgres soak fuzz vuln demo clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

deps: ## install the Debian packages tests need (PostgreSQL), if missing
	scripts/install-deps.sh

NODE_DEPS := examples/node/node_modules/.package-lock.json

SPIRE := $(BIN)/spire-server $(BIN)/spire-agent

tools: $(PROTO_TOOLS) $(BUF) $(BIN)/jaeger $(SPIRE) $(BIN)/hydra $(BIN)/etcd $(LINT_TOOLS) $(NODE_DEPS) ## install pinned tools into ./bin, tools/buf and examples/node

$(PROTO_TOOLS) &: tools/proto/go.mod tools/proto/go.sum
	cd tools/proto && GOBIN=$(BIN) go install tool
	@touch $(PROTO_TOOLS)

grpcurl: $(BIN)/grpcurl ## install only the pinned grpcurl (and protoc plugins) into ./bin

# Jaeger all-in-one for the tracing round-trip test (~4 min cold build).
$(BIN)/jaeger: tools/jaeger/go.mod tools/jaeger/go.sum
	cd tools/jaeger && GOBIN=$(BIN) go install tool
	@touch $@

# golangci-lint (config: .golangci.yml) and govulncheck.
$(LINT_TOOLS) &: tools/lint/go.mod tools/lint/go.sum
	cd tools/lint && GOBIN=$(BIN) go install tool
	@touch $(LINT_TOOLS)

# SPIRE server and agent for the Workload API tests (~8-12 min cold build, cgo).
$(SPIRE) &: tools/spire/go.mod tools/spire/go.sum
	cd tools/spire && GOBIN=$(BIN) go install tool
	@touch $(SPIRE)

# ORY Hydra, the OAuth2 server the OAuth2 backend is tested against (~2 min cold).
$(BIN)/hydra: tools/hydra/go.mod tools/hydra/go.sum
	cd tools/hydra && GOBIN=$(BIN) go install -tags sqlite,sqlite_omit_load_extension tool
	@touch $@

# etcd 3.7 for the etcd store engine's tests, the benchmark and the cluster
# example (~1 min cold).
$(BIN)/etcd: tools/etcd/go.mod tools/etcd/go.sum tools/etcd/main.go
	cd tools/etcd && go build -o $(BIN)/etcd .

# The Node.js example agent's gRPC libraries, for its round-trip test.
$(NODE_DEPS): examples/node/package.json examples/node/package-lock.json
	cd examples/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(BUF): tools/buf/package.json tools/buf/package-lock.json
	cd tools/buf && npm ci --no-audit --no-fund --loglevel=error
	@touch $(BUF)

build: ## build bin/leasehold
	go build -o $(BIN)/leasehold ./cmd/leasehold

generate: tools ## regenerate Go code from proto/ with buf
	$(BUF) generate

generate-check: generate ## fail if generated code is not what is committed
	@git diff --exit-code -- proto || { echo "generated code is stale: run 'make generate' and commit"; exit 1; }
	@if [ -n "$$(git status --porcelain -- proto | grep '^??' || true)" ]; then \
		git status --porcelain -- proto; echo "generated files are not committed"; exit 1; fi

lint: tools ## gofmt, go vet, golangci-lint (gosec, errorlint, depguard, ...), govulncheck, buf lint, buf breaking
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	$(BIN)/golangci-lint run ./...
	$(MAKE) --no-print-directory vuln
	$(BUF) lint
	$(MAKE) --no-print-directory breaking

vuln: $(BIN)/govulncheck ## govulncheck against the pinned vulnerability database snapshot
	@db=$$(go mod download -json golang.org/x/vulndb@$(VULNDB_VERSION) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p'); \
	  test -d "$$db/data/osv" || { echo "vulndb snapshot not found"; exit 1; }; \
	  echo "govulncheck with golang.org/x/vulndb@$(VULNDB_VERSION), $$(go env GOVERSION)"; \
	  $(BIN)/govulncheck -db "file://$$db/data/osv" ./...

breaking: tools ## buf breaking against the main branch (when main has proto/)
	@if git rev-parse -q --verify main >/dev/null && git cat-file -e main:proto 2>/dev/null; then \
		$(BUF) breaking --against '.git#branch=main'; echo "buf breaking: ok against main"; \
	else echo "buf breaking: no proto/ on main yet, nothing to compare"; fi

test: deps tools generate-check lint test-go ## every check and test (what CI runs)

test-go: tools ## go test -race over every package
	LEASEHOLD_GRPCURL=$(BIN)/grpcurl LEASEHOLD_JAEGER=$(BIN)/jaeger \
	LEASEHOLD_SPIRE_SERVER=$(BIN)/spire-server LEASEHOLD_SPIRE_AGENT=$(BIN)/spire-agent LEASEHOLD_HYDRA=$(BIN)/hydra \
	LEASEHOLD_ETCD=$(BIN)/etcd $(GO_TEST) ./...

BENCH_DIR ?= /var/tmp/leasehold-bench

bench: ## load test with the ratio to the ceiling, scale figures, Go benchmarks (docs/benchmarks.md)
	go build -o $(BIN)/leasehold-bench ./cmd/leasehold-bench
	$(BIN)/leasehold-bench acquire --agents 64 --duration 10s
	$(BIN)/leasehold-bench acquire --agents 64 --duration 10s --dir $(BENCH_DIR)/10k --prefill 10000 --revoke-leases 10000
	$(BIN)/leasehold-bench acquire --agents 64 --duration 10s --dir $(BENCH_DIR)/1m --prefill 1000000 --revoke-leases 10000
	go test -run '^$$' -bench . -benchmem ./server/ ./store/bolt/

bench-etcd: $(BIN)/etcd ## acquire throughput on one etcd member: one broker, then two sharing it (docs/benchmarks.md)
	go build -o $(BIN)/leasehold-bench ./cmd/leasehold-bench
	$(BIN)/leasehold-bench acquire --agents 64 --duration 10s --store etcd --brokers 1
	$(BIN)/leasehold-bench acquire --agents 64 --duration 10s --store etcd --brokers 2

bench-postgres: deps ## PostgreSQL leases issued and roles revoked per second (docs/benchmarks.md)
	go test -run '^$$' -bench 'Postgres' -benchtime 3000x -count 3 ./server/

soak: ## 50 SIGKILL crash cycles under load against the broker binary (docs/reliability.md)
	LEASEHOLD_CRASH_CYCLES=50 go test -count=1 -run TestCrashCycles -v ./cmd/leasehold/ | grep -E 'cycle|PASS|FAIL|ok'

FUZZTIME ?= 30s
FUZZ_PKGS := ./server/ ./store/internal/kv/ ./cmd/leasehold/

fuzz: ## run every fuzz target for FUZZTIME each (seeds run in every `make test`)
	@for p in $(FUZZ_PKGS); do for f in $$(go test -list '^Fuzz' $$p | grep ^Fuzz); do \
		echo "== $$p $$f"; go test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$p || exit 1; done; done

demo: build ## dev broker, an agent acquiring/using/releasing a lease, the audit trail
	LEASEHOLD=$(BIN)/leasehold scripts/demo.sh

example-orchestrator: build ## an orchestrator and two sub-agents doing one task with leases
	LEASEHOLD=$(BIN)/leasehold scripts/orchestrator.sh

example-cluster: build $(BIN)/etcd ## three etcd members, two brokers sharing them; kill the leader, then a member (docs/deployment.md)
	LEASEHOLD=$(BIN)/leasehold ETCD=$(BIN)/etcd scripts/cluster.sh

clean: ## remove built binaries and demo state
	rm -rf $(BIN) .demo .demo-orchestrator .demo-cluster
