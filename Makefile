# The two commands of the README: `make run` and `make test`.
.PHONY: run test lint fmt deps test-deps build bench drill bench-build

CARGO ?= cargo

deps:
	@scripts/ensure-deps.sh

test-deps:
	@scripts/ensure-deps.sh --ops

## make run: local Redis and Postgres, migrations, demo chats, and the services, in the foreground
run: deps
	@scripts/run-local.sh

## make test: the whole suite against real Redis and Postgres servers the tests start
## themselves, schemathesis against the live api, and the validators of the ops artefacts.
## Without cargo-nextest, cargo test runs the tests .config/nextest.toml makes run alone
## (they measure timing) after the others, one at a time.
ALONE := $(shell grep -o 'test([a-z0-9_]*)' .config/nextest.toml | sed 's/test(\(.*\))/\1/')
test: test-deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast && \
		$(CARGO) nextest run --workspace --run-ignored only --no-fail-fast; \
	else \
		echo "make test: cargo-nextest is missing (cargo install cargo-nextest --locked); using cargo test" >&2; \
		$(CARGO) test --workspace --no-fail-fast -- --test-threads 4 $(foreach t,$(ALONE),--skip $(t)) && \
		$(CARGO) test --workspace --no-fail-fast -- --test-threads 1 $(ALONE) && \
		$(CARGO) test --workspace --no-fail-fast -- --ignored; \
	fi
	@scripts/check-scripts.sh
	@scripts/check-ops.sh

## make lint: formatting and clippy, warnings are errors; cargo deny's licenses, bans and
## sources (deny.toml), installing cargo-deny first when missing (a few minutes, once). Its
## advisories check needs the RustSec database from github.com: `cargo deny check advisories`
## where that is reachable (README, Development).
CARGO_DENY_VERSION ?= 0.20.2
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@$(CARGO) deny --version 2>/dev/null | grep -qx 'cargo-deny $(CARGO_DENY_VERSION)' || \
		{ echo "lint: installing cargo-deny $(CARGO_DENY_VERSION) from crates.io" >&2; \
		  $(CARGO) install cargo-deny --locked --version $(CARGO_DENY_VERSION); }
	$(CARGO) deny check licenses bans sources

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --workspace --release

## make bench: benchmark tables (each command starts its own servers and takes at most ~10 min;
## release build; needs wrk, installed here if missing)
bench: deps bench-build
	./target/release/bench read --chats 150000 --seconds 15
	./target/release/bench sync --chats 30000 --rps 300 --latency 30ms --replicas 1,3
	./target/release/bench fresh --chats 150000 --scale 30 --hours 2

## make drill: fault drills under load, one row each (about 8 min), then the soak (about 12 min)
drill: deps bench-build
	./target/release/bench drill
	./target/release/bench shutdown
	./target/release/bench soak --minutes 6

bench-build:
	@command -v wrk >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)
	$(CARGO) build --release --quiet -p bench -p api -p syncd
