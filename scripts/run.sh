#!/usr/bin/env bash
# Starts the whole system locally in one process on embedded defaults.
#
#   scripts/run.sh [oneprotect-dev up options]        (README's run command: `make run`)
#
# Installs the build prerequisites when missing (cmake, make, a C compiler: see
# scripts/prereqs.sh), then builds and runs `oneprotect-dev up`: enroll-api on SQLite,
# a generated dev CA, the gateway, a demo upstream and the in-process revocation bus.
# State goes to .data/dev/ (`--data-dir` moves it); `up` prints what to try next and
# writes .data/dev/stack.json. Ctrl-C stops it. A second run installs nothing and
# starts in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

ensure_prereqs build
if [ ! -x "${CARGO_TARGET_DIR:-target}/debug/oneprotect-dev" ]; then
  prereq_say "building oneprotect-dev (the first build takes about 10 minutes on 2 cores)"
fi
exec cargo run --locked -p oneprotect-dev -- up "$@"
