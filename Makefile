# Developer shortcuts over cargo.

.PHONY: run demo test validate-contracts bench-quick ci

## run: start the whole system in one process on embedded defaults (SQLite, dev CA,
## in-process revocation bus, demo upstream); installs cmake/make/cc first when missing.
## Ctrl-C stops it.
run:
	scripts/run.sh

## demo: the agent lifecycle, scripted, against a running `make run`.
demo:
	cargo run -q -p oneprotect-dev -- demo

## test: every test; installs what is missing and starts private PostgreSQL and Redis
## unless ONEPROTECT_TEST_DATABASE_URL / ONEPROTECT_TEST_REDIS_URL answer.
test:
	scripts/test.sh

## validate-contracts: check specs/ (OpenAPI, AsyncAPI, event schemas and examples) against
## their meta-schemas, each other and the Rust types in identity/.
validate-contracts:
	cargo test -p oneprotect-tests --test suite contracts::

## bench-quick: every bench scenario in under two minutes (release build).
bench-quick:
	cargo build --release -p oneprotect-gateway -p oneprotect-bench
	target/release/oneprotect-bench all --quick

## ci: what CI runs.
ci:
	bash .ci/run
