# Developer shortcuts over cargo.

.PHONY: run test validate-contracts bench-quick ci

## run: start the local system (enroll-api on SQLite, gateway, demo upstream); needs Redis.
run:
	bash scripts/dev-up.sh

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
