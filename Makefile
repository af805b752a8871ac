# Two commands matter: `make demo` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian packages: iptables/iproute2/util-linux for capture tests, the rest for benchmarks.
APT_TEST := iptables iproute2 util-linux curl procps wrk nghttp2-client
APT_BENCH := nginx-light libnginx-mod-stream iperf3 haproxy

.PHONY: demo test bench lint fuzz system-deps system-deps-bench clean apt

demo: system-deps $(VENV)/.installed-test
	$(PY) -m pyproxy demo

test: system-deps $(VENV)/.installed-test
	$(VENV)/bin/pytest

# Every bench measures its own baselines in the same run; results land in bench/results/.
BENCHES := tcp_echo http_bench filter_bench grpc_bench native_paths

bench: system-deps system-deps-bench $(VENV)/.installed-test
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) -m pyproxy.bench.$$b || exit 1; done

bench-%: system-deps system-deps-bench $(VENV)/.installed-test
	$(PY) -m pyproxy.bench.$*

# Coverage-guided fuzzing (atheris) of every codec and the config loader, FUZZ_SECONDS in
# total shared by the targets; the regression corpus is replayed by `make test` as well.
FUZZ_SECONDS ?= 240

fuzz: $(VENV)/.installed-test
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q -e '.[fuzz]'
	cd tests && $(abspath $(PY)) -m fuzz --seconds $(FUZZ_SECONDS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

$(VENV)/.installed-test: pyproject.toml setup.py native/build_native.py native/pyproxy_native.c native/http1_head.c native/http1_scan.h native/express_lane.c
	@python3 -m venv $(VENV) 2>/dev/null || { $(MAKE) --no-print-directory apt PKGS=python3-venv && python3 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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
	@$(MAKE) --no-print-directory apt PKGS="$(APT_TEST)"

system-deps-bench:
	@$(MAKE) --no-print-directory apt PKGS="$(APT_BENCH)"

clean:
	rm -rf $(VENV) build *.egg-info native/_native*.so
