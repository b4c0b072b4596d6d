# qaserve: `make run` serves the embedded model, `make test` runs the test suite. Both install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.installed-serve
STAMP := $(VENV)/.installed
PROTO_SRC := protos/qaserve/v1
PROTO_PKG := client/qaserve_client/v1
GO_PKG := client/go/qaserve/v1
ARGS ?=
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# Installs Debian packages with apt-get (as root, or through sudo), only when one of them is missing.
apt_install = dpkg -s $(1) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(1); }

.PHONY: install browser prometheus node-deps client-deps proto proto-check proto-lint proto-breaking layers run test lint docker \
	docker-export wheels image-context release deploy-check bench bench-reader bench-gpu bench-threads accuracy \
	parity reliability clean

install: $(STAMP)

# What serving the embedded model needs (`make run`): the server on ONNX Runtime for the CPU, no torch. Everything
# else (make install, test, lint, ...) adds the torch extra (the torch backend, `qaserve export`), the client's
# haystack extra (QAServeReader) and the development tools to the same environment.
$(SERVE_STAMP): constraints.txt client/pyproject.toml server/pyproject.toml VERSION
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ./client -e './server[cpu]'
	touch $@

$(STAMP): $(SERVE_STAMP) requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e './client[haystack]' -e './server[cpu,torch]' -r requirements-dev.txt
	touch $@

# Debian's chromium and its WebDriver: the test of the HTTP door's page drives it headless (selenium).
BROWSER_DEBS := chromium chromium-driver

browser:
	$(call apt_install,$(BROWSER_DEBS))

# The Node.js client's packages (client/node), exactly as locked. `make test` installs them where npm exists.
NODE_DEPS := client/node/node_modules/.package-lock.json
# @huggingface/inference for docs/http.md's JavaScript example (tests/http_node), exactly as locked.
HTTP_NODE_DEPS := tests/http_node/node_modules/.package-lock.json

node-deps: $(NODE_DEPS) $(HTTP_NODE_DEPS)

$(NODE_DEPS): client/node/package.json client/node/package-lock.json
	cd client/node && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

$(HTTP_NODE_DEPS): tests/http_node/package.json tests/http_node/package-lock.json
	cd tests/http_node && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# The googleapis protos the contract imports (google/rpc/status.proto) and the error details clients decode
# (google/rpc/error_details.proto), taken from the googleapis-common-protos wheel pinned in constraints.txt (the one
# the Python client installs) into an ignored folder that buf.yaml (as a second module) and every language's build
# include. Nothing of theirs is copied into the repo, and the Go, C++ and Node.js clients need no `make install`.
GOOGLEAPIS := build/googleapis
GOOGLEAPIS_PLACED := $(GOOGLEAPIS)/.placed
PIP_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

$(GOOGLEAPIS_PLACED): constraints.txt
	rm -rf $(GOOGLEAPIS) build/googleapis-wheel
	$(PIP_PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
		-c constraints.txt -d build/googleapis-wheel googleapis-common-protos
	$(PIP_PYTHON) -m zipfile -e build/googleapis-wheel/googleapis_common_protos-*.whl build/googleapis-wheel/unpacked
	mkdir -p $(GOOGLEAPIS)/google/rpc
	cp build/googleapis-wheel/unpacked/google/rpc/status.proto \
		build/googleapis-wheel/unpacked/google/rpc/error_details.proto $(GOOGLEAPIS)/google/rpc/
	touch $@

# buf (npm @bufbuild/buf, locked in tools/buf/package-lock.json): lint, breaking and the Go generation.
BUF := tools/buf/node_modules/.bin/buf
BUF_AGAINST ?= HEAD~1

$(BUF): tools/buf/package.json tools/buf/package-lock.json
	cd tools/buf && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# Go in GOPATH mode on Debian's packages (no Go module proxy needed): /usr/share/gocode holds grpc-go, protobuf-go
# and genproto; build/go holds the plugins and links the repo's Go module in under its import path.
GO_MODULE := github.com/qaserve/qaserve/client/go
GO_ENV := GO111MODULE=off GOFLAGS= GOPATH=$(CURDIR)/build/go:/usr/share/gocode
GO_PLUGINS := build/go/bin/protoc-gen-go build/go/bin/protoc-gen-go-grpc
GO_LINK := build/go/src/$(GO_MODULE)
need = @command -v $(1) >/dev/null || { echo "$(1) is missing: run \`make client-deps\` (Debian and npm packages)"; exit 1; }

build/go/bin/protoc-gen-go:
	$(call need,go)
	$(GO_ENV) go build -o $@ google.golang.org/protobuf/cmd/protoc-gen-go

build/go/bin/protoc-gen-go-grpc:
	$(call need,go)
	$(GO_ENV) go build -o $@ google.golang.org/grpc/cmd/protoc-gen-go-grpc

$(GO_LINK):
	mkdir -p $(@D) && ln -sfn $(CURDIR)/client/go $@

# Regenerates every language's committed code from protos/: Python messages, gRPC stubs and .pyi type stubs into
# the client package (by the pinned grpcio-tools, whose protoc matches the pinned protobuf runtime), and Go into
# client/go (buf generate, buf.gen.yaml). protoc names Python modules after the proto path (qaserve.v1.*); the sed
# moves those imports under qaserve_client.v1.
proto: $(STAMP) $(GOOGLEAPIS_PLACED) $(BUF) $(GO_PLUGINS)
	rm -rf $(PROTO_PKG) build/proto && mkdir -p $(PROTO_PKG) build/proto
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) \
		--python_out=build/proto --grpc_python_out=build/proto --mypy_out=build/proto --mypy_grpc_out=build/proto \
		$(PROTO_SRC)/*.proto
	mv build/proto/qaserve/v1/* $(PROTO_PKG)/
	sed -i -E 's/^from qaserve\.v1 import/from qaserve_client.v1 import/; s/\bqaserve\.v1\.([a-z_]+_pb2)\b/qaserve_client.v1.\1/g' \
		$(PROTO_PKG)/*.py $(PROTO_PKG)/*.pyi
	echo '"""Generated protobuf messages and gRPC stubs for qaserve.v1 (make proto)."""' > $(PROTO_PKG)/__init__.py
	rm -f $(GO_PKG)/*.pb.go
	$(BUF) generate

proto-check: proto
	git diff --exit-code -- $(PROTO_PKG) $(GO_PKG) && test -z "$$(git status --porcelain -- $(PROTO_PKG) $(GO_PKG))"

# buf lint (STANDARD, buf.yaml) on protos/, and buf breaking against protos/ as of BUF_AGAINST (a PR's base branch,
# say), laid out beside the same googleapis folder.
proto-lint: $(GOOGLEAPIS_PLACED) $(BUF)
	$(BUF) lint

proto-breaking: $(GOOGLEAPIS_PLACED) $(BUF)
	@git rev-parse --verify --quiet '$(BUF_AGAINST)^{commit}' >/dev/null || \
		{ echo "proto-breaking: no commit $(BUF_AGAINST) to compare with (fetch more history, or set BUF_AGAINST)"; exit 1; }
	rm -rf build/buf/against && mkdir -p build/buf/against/build
	git archive '$(BUF_AGAINST)' protos | tar -x -C build/buf/against
	cp buf.yaml build/buf/against/ && cp -r $(GOOGLEAPIS) build/buf/against/build/
	$(BUF) breaking --against build/buf/against

# The Go, C++ and Node.js clients (client/go, client/cpp, client/node; docs/clients.md). TARGET=HOST:PORT names a
# running qaserve for the tests and examples; tests/clients runs the tests against a server of its own.
.PHONY: client-go client-go-test client-cpp client-cpp-test client-node-test client-examples
TARGET ?=
CPP_BUILD := build/cpp
GO_EXAMPLE := build/go/bin/qaserve-example
need_target = @test -n "$(TARGET)" || { echo "set TARGET=HOST:PORT of a running qaserve"; exit 2; }

# The Debian packages the Go and C++ clients build from (Go 1.19, grpc-go 1.33, protobuf-go 1.28, gRPC C++ 1.51,
# GoogleTest), Node.js where it is missing, then the Node.js client's npm packages, the buf CLI, the Go protoc
# plugins and the googleapis protos (after it, `buf build` and `buf generate` work offline). apt runs only when a
# package is missing.
# golang-github-golang-protobuf-1-5-dev replaces the 1.3 package that comes by default, which panics on oneof fields.
CLIENT_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev \
	golang-google-genproto-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev cmake g++ \
	libgtest-dev

client-deps:
	$(call apt_install,$(CLIENT_DEBS))
	command -v npm >/dev/null || $(call apt_install,nodejs npm)
	$(MAKE) --no-print-directory node-deps $(BUF) $(GO_PLUGINS) $(GOOGLEAPIS_PLACED)

client-go: $(GO_LINK)
	$(call need,go)
	@unformatted="$$(gofmt -l client/go)"; test -z "$$unformatted" || { echo "not gofmt-formatted: $$unformatted"; exit 1; }
	cd $(GO_LINK) && $(GO_ENV) go vet ./... && $(GO_ENV) go build -o $(CURDIR)/$(GO_EXAMPLE) ./cmd/qaserve-example

client-go-test: client-go
	$(need_target)
	cd $(GO_LINK) && $(GO_ENV) QASERVE_TARGET=$(TARGET) go test -count=1 ./...

client-cpp: $(GOOGLEAPIS_PLACED)
	$(call need,cmake)
	cmake -S client/cpp -B $(CPP_BUILD) -DGOOGLEAPIS_DIR=$(CURDIR)/$(GOOGLEAPIS)
	cmake --build $(CPP_BUILD) --parallel $$(nproc)

client-cpp-test: client-cpp
	$(need_target)
	QASERVE_TARGET=$(TARGET) $(CPP_BUILD)/qaserve-client-test

client-node-test: $(NODE_DEPS)
	$(need_target)
	cd client/node && QASERVE_TARGET=$(TARGET) node --test test/

# From a fresh clone: installs what the clients need, builds the three examples and runs each against TARGET.
client-examples: client-deps client-go client-cpp
	$(need_target)
	$(GO_EXAMPLE) $(TARGET)
	$(CPP_BUILD)/qaserve-example $(TARGET)
	node client/node/example.mjs $(TARGET)

# The layering contract ([tool.importlinter] in pyproject.toml): qa/ and runtime/ free of gRPC, framework imports
# only under runtime/backends/ and the export command, the client free of the server.
layers: $(STAMP)
	$(BIN)/lint-imports --no-cache

run: $(SERVE_STAMP)
	$(BIN)/qaserve serve $(ARGS)

test: $(STAMP) $(if $(shell command -v npm),$(NODE_DEPS) $(HTTP_NODE_DEPS))
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The image (needs a Docker engine; CI lints the Dockerfile instead). DEVICE=cpu (default): no torch, the onnx
# backend serves the embedded model's model.onnx; tagged qaserve:VERSION. DEVICE=cuda: the server's [torch,cuda]
# extras on CUDA torch, CUDA_WHEEL picking the PyTorch wheel index (cu130, cu128, ...); tagged qaserve:VERSION-cuda,
# the tag deploy/k8s/components/gpu runs. docker-export: the Dockerfile's export target, `qaserve export` on CPU
# torch, tagged qaserve:VERSION-export (deploy/k8s/components/model-export runs it). VERSION (the file) is the one
# version of the wheels, images and manifests.
VERSION := $(shell cat VERSION)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
DEVICE ?= cpu
CUDA_WHEEL ?= cu130
IMAGE ?= qaserve:$(VERSION)$(if $(filter cuda,$(DEVICE)),-cuda)
DIST ?= dist
CONTEXT = build/image-$(DEVICE)
WHEELS = $(DIST)/qaserve_client-$(VERSION)-py3-none-any.whl $(DIST)/qaserve-$(VERSION)-py3-none-any.whl

docker: image-context
	docker build --build-arg CUDA_WHEEL=$(CUDA_WHEEL) -t $(IMAGE) $(CONTEXT)

docker-export: image-context
	docker build --target export -t qaserve:$(VERSION)-export $(CONTEXT)

# Both distributions' wheels, of VERSION, in DIST.
wheels: $(STAMP)
	mkdir -p $(DIST) && rm -f $(DIST)/*.whl
	$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w $(DIST) ./client ./server

# build/image-DEVICE: what the image is built from, alone: the Dockerfile with DEVICE, VERSION and REVISION as its
# defaults (its OCI labels), the two wheels, constraints.txt (the lock every dependency installs at) and the
# embedded model.
image-context: wheels
	rm -rf $(CONTEXT) && mkdir -p $(CONTEXT)/wheels
	cp $(WHEELS) $(CONTEXT)/wheels/
	cp constraints.txt $(CONTEXT)/
	git ls-files -z models | xargs -0 cp --parents -t $(CONTEXT)
	sed -e 's/^ARG DEVICE=cpu$$/ARG DEVICE=$(DEVICE)/' -e 's/^ARG VERSION=unknown$$/ARG VERSION=$(VERSION)/' \
		-e 's/^ARG REVISION=unknown$$/ARG REVISION=$(REVISION)/' Dockerfile > $(CONTEXT)/Dockerfile

# The release, in DIST: both wheels and both images' build contexts (docker build - < CONTEXT.tar.gz), one VERSION.
release:
	$(MAKE) image-context DEVICE=cpu
	$(MAKE) image-context DEVICE=cuda
	tar -C build/image-cpu -czf $(DIST)/qaserve-$(VERSION)-image-cpu.tar.gz .
	tar -C build/image-cuda -czf $(DIST)/qaserve-$(VERSION)-image-cuda.tar.gz .
	ls -l $(DIST)

# Prometheus and promtool (Debian's prometheus package): the real-Prometheus test and the alert rules' checks (make
# test, make deploy-check) need them. Does nothing where the package is installed.
prometheus:
	$(call apt_install,prometheus)

# hadolint on the Dockerfile; every deploy/k8s target (base, base + each component, overlays) rendered by
# `kubectl kustomize` (kubectl on PATH) and checked against the Kubernetes schemas (kubernetes-validate) and each other.
deploy-check: $(STAMP)
	$(BIN)/python deploy/check.py

# Evaluation data ships in bench/data. bench: bare-model baselines and qaserve rows in one table with ratios
# (ARGS: --seconds, --limit, --backends, --models, --markdown FILE; see --help). accuracy: SQuAD v1.1 dev EM/F1
# (ARGS: --backend torch|onnx, --model DIR, --limit N). parity: against the transformers 4.x pipeline (--backend).
bench: $(STAMP)
	PYTHONPATH=tests $(BIN)/python -m bench.load $(ARGS)

# bench/gpu.py on a CUDA GPU (ARGS: --dtypes, --batch-sizes, --dry-run to check it on a CPU; see --help).
bench-gpu: $(STAMP)
	PYTHONPATH=tests $(BIN)/python -m bench.gpu $(ARGS)

# How a CPU model's forward passes should share the cores (bench/threads.py: the numbers behind runtime/policy.py;
# ARGS: --rounds, --seconds, --context-paragraphs, --no-torch).
bench-threads: $(STAMP)
	$(BIN)/python -m bench.threads $(ARGS)

accuracy: $(STAMP)
	$(BIN)/python -m bench.accuracy $(ARGS)

# One Read over a question's 10 passages against 10 concurrent Answer calls, at concurrency 1 and 8 (bench/reader.py;
# ARGS: --seconds, --limit, --concurrency, --server-args).
bench-reader: $(STAMP)
	PYTHONPATH=tests $(BIN)/python -m bench.reader $(ARGS)

# The reference for answer parity: the transformers 4.x QA pipeline, in its own environment.
.venv-hf4/.installed:
	$(PYTHON) -m venv .venv-hf4
	.venv-hf4/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 transformers==4.57.6 tokenizers==0.22.2
	touch $@

parity: $(STAMP) .venv-hf4/.installed
	$(BIN)/python -m bench.parity --reference-python .venv-hf4/bin/python $(ARGS)

# Load, cancellation storm, deadlines, bad input and faults against a local server (loopback only, a few minutes);
# pytest runs a smaller version. ARGS: --ci, --requests N, --concurrency N, --markdown FILE (see --help).
reliability: $(STAMP)
	PYTHONPATH=tests $(BIN)/python -m reliability $(ARGS)

clean:
	rm -rf $(VENV) .venv-hf4 .pytest_cache .mypy_cache .ruff_cache build dist client/node/node_modules tools/buf/node_modules \
		tests/http_node/node_modules
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
