# Two commands matter: `make demo` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian packages: a C toolchain and Python headers for the native module, acl to let the sidecar's
# uid 1337 reach the checkout; clang, llvm, libbpf-dev and linux-libc-dev build and load the eBPF
# programs; libnghttp2-dev the native HTTP/2 codec; iptables/iproute2/util-linux for capture
# tests, openssl for the webhook tests, podman/runc/debootstrap for the image tests, chromium for
# the admin page test; the rest for benchmarks. Node and npm (for the AssemblyScript Proxy-Wasm SDK
# that builds the wasm test modules) come from Debian only when no node is installed: a NodeSource
# node bundles its own npm.
APT_BUILD := gcc libc6-dev python3-dev python3-venv acl clang llvm libbpf-dev linux-libc-dev bpftool libnghttp2-dev
APT_TEST := iptables iproute2 util-linux curl procps wrk nghttp2-client openssl podman runc buildah debootstrap chromium
APT_BENCH := nginx-light libnginx-mod-stream libnginx-mod-http-lua iperf3 haproxy caddy bpftrace

.PHONY: demo test bench soak fuzz lint fresh-check system-deps system-deps-bench clean apt

demo: system-deps $(VENV)/.installed-test
	$(PY) -m pyproxy demo

# The suite on parallel workers (a test module stays on one worker, its fixtures set up once),
# then, alone, the modules that touch what the whole host shares (tests/conftest.py: HOST_WIDE).
TEST_WORKERS ?= auto
test: system-deps $(VENV)/.installed-test
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not host_wide"
	$(VENV)/bin/pytest -m host_wide

# Every bench measures its own baselines in the same run; results land in bench/results/.
BENCHES := tcp_echo http_bench filter_bench filtered_path grpc_bench native_paths h2_codec_bench

bench: system-deps system-deps-bench $(VENV)/.installed-test
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) -m pyproxy.bench.$$b || exit 1; done

# One bench, with its options: make bench-http_bench BENCH_ARGS="--baseline-tree ../before"
BENCH_ARGS ?=
bench-%: system-deps system-deps-bench $(VENV)/.installed-test
	$(PY) -m pyproxy.bench.$* $(BENCH_ARGS)

# HTTP mode, every filter on, near capacity; fails on lost requests or RSS/fd growth.
SOAK_SECONDS ?= 180
soak: system-deps system-deps-bench $(VENV)/.installed-test
	$(PY) -m pyproxy.bench.soak --seconds $(SOAK_SECONDS)

# Coverage-guided fuzzing (atheris) of every codec and the config loader, FUZZ_SECONDS in
# total shared by the targets; the regression corpus is replayed by `make test` as well.
FUZZ_SECONDS ?= 240

fuzz: $(VENV)/.installed-test
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q -e '.[fuzz]'
	cd tests && $(abspath $(PY)) -m fuzz --seconds $(FUZZ_SECONDS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

$(VENV)/.installed-test: pyproject.toml setup.py native/build_native.py native/facts_header.py pyproxy/protocol.py pyproxy/counters.py native/pyproxy_native.c native/pyproxy_native.h native/http1_head.c native/http1_scan.h native/express_lane.c native/pool_pages.c native/wasm_call.c native/h2_codec.c native/h2_codec.h native/grow_buf.h native/h2_lane.c native/h2_lane.h native/h2_taker.h native/grpc_lane.c native/grpc_lane.h native/lane_fields.h \
		native/pyproxy_bpf.c native/pyproxy_bpf.h native/echo_rtt.c $(wildcard native/*.bpf.c)
	@python3 -m venv $(VENV) >/dev/null 2>&1 || { $(MAKE) --no-print-directory apt PKGS=python3-venv && python3 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@$(PY) -m pyproxy.native.check $$( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo --strict)
	@scripts/proxy-user-access.sh $(PY)
	@PROXY_UID=1000 scripts/proxy-user-access.sh $(PY)  # the pod bench's client app runs as uid 1000
	@touch $@

# Install Debian packages only when root with apt, and only those missing.
apt:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

system-deps:
	@$(MAKE) --no-print-directory apt PKGS="$(APT_BUILD) $(APT_TEST)"
	@command -v npm >/dev/null || $(MAKE) --no-print-directory apt PKGS="nodejs npm"
	@if ! { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; }; then \
	  missing=$$(for p in $(APT_BUILD) $(APT_TEST); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done | tr '\n' ' '); \
	  echo "set-up: not root with apt-get, so no Debian package is installed."; \
	  [ -z "$$missing" ] || echo "set-up: missing: $$missing(as root: apt-get install $$missing)"; \
	  echo "set-up: without a compiler the native module is not built (python -m pyproxy.native.check" \
	    "says what is missing); the capture, eBPF and image tests need root."; \
	fi

system-deps-bench:
	@$(MAKE) --no-print-directory apt PKGS="$(APT_BENCH)"

# The two commands above on a minimal Debian root made by debootstrap, from a clean clone (root).
fresh-check:
	scripts/fresh-check.sh

clean:
	rm -rf $(VENV) build *.egg-info native/_native*.so native/_bpf*.so native/_h2*.so native/*.bpf.o
