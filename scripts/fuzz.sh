#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each; FUZZ_SECONDS to
# change). Needs cargo-fuzz (`cargo install cargo-fuzz`); libFuzzer's
# instrumentation uses unstable rustc flags, allowed here on the stable
# toolchain with RUSTC_BOOTSTRAP=1. Not part of CI. A crash leaves its input
# under fuzz/artifacts/<target>/: add it as a regression test of the crate
# whose code crashed and commit both. The seed inputs came from a dev stack
# (`oneprotect-dev up`: its tenant CA and root, an openssl P-256 CSR).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
for t in identity_uri agent_identity_from_chain assertion_verify csr_check fast_path_http1; do
  echo "==> $t (${SECS}s)"
  # New inputs go to corpus/<target> (not committed); seeds/<target> holds
  # small committed starting points (valid URIs, a real CA chain, a CSR).
  mkdir -p "corpus/$t"
  cargo fuzz run --sanitizer none "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048
done
