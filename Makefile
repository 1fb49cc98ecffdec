# Developer shortcuts over cargo.

.PHONY: run demo test validate-contracts bench-quick ci

## run: start the whole system in one process on embedded defaults (SQLite, dev CA,
## in-process revocation bus, demo upstream); needs nothing installed. Ctrl-C stops it.
run:
	cargo run -p oneprotect-dev -- up

## demo: the agent lifecycle, scripted, against a running `make run`.
demo:
	cargo run -q -p oneprotect-dev -- demo

## test: every test (needs PostgreSQL and Redis on loopback; see README).
test:
	cargo test --workspace

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
