# Developer shortcuts over cargo.

.PHONY: validate-contracts

## validate-contracts: check specs/ (OpenAPI, AsyncAPI, event schemas and examples) against
## their meta-schemas, each other and the Rust types in identity/.
validate-contracts:
	cargo test -p oneprotect-tests --test suite contracts::
