#!/usr/bin/env bash
# Fails if a second crypto provider (aws-lc) or OpenSSL enters the dependency tree.
# Two rustls providers in one process make rustls' builders panic; pingora's
# rustls backend installs ring. See docs/adr/0001-one-crypto-provider-ring.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=0
for crate in aws-lc-sys aws-lc-rs openssl-sys; do
  # `cargo tree -i` exits non-zero with "did not match any packages" when absent.
  if out=$(cargo tree --workspace --all-features -e normal,build,dev -i "$crate" 2>&1); then
    echo "FORBIDDEN: $crate is in the dependency tree:" >&2
    echo "$out" | head -20 >&2
    bad=1
  elif ! grep -q "did not match any packages" <<<"$out"; then
    echo "cargo tree failed unexpectedly for $crate:" >&2
    echo "$out" >&2
    bad=1
  else
    echo "ok: $crate absent"
  fi
done
exit "$bad"
